"""Synthetic pair shards made with a (tiny) model: for tests, benchmarks and `make demo`.

Each pair gets two random videos (stored as real mp4 bytes) and, optionally, their latents encoded by the model's
VAE from the DECODED mp4 frames, so the stored-latents path and the encode-per-step path see the same latents.
"""

from __future__ import annotations

from typing import Sequence

import torch

from videodpo_ray import shards, tensor_bytes
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.shards import ShardInfo
from videodpo_ray.video import decode_mp4, encode_mp4

PROMPTS = (
    "a red fox runs through snow",
    "waves crash on a rocky shore",
    "a city street at night in the rain",
    "a cat sleeps on a sofa",
    "fireworks over a lake",
    "a hot air balloon rises at dawn",
    "",  # an empty prompt in the data must still work
)


def synthetic_pair_rows(
    model: VideoDiffusionModel,
    *,
    num_pairs: int,
    num_frames: int,
    height: int,
    width: int,
    fps: int = 8,
    seed: int = 0,
    with_latents: bool = True,
    with_videos: bool = True,
    with_text_embeddings: bool = False,
    latent_dtype: torch.dtype = torch.float32,
    prompts: Sequence[str] = PROMPTS,
    first_index: int = 0,
) -> list[dict]:
    """Rows of the pairs schema; pair i (global index first_index + i) uses prompt i mod len(prompts)."""
    rows = []
    for offset in range(num_pairs):
        index = first_index + offset
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        videos = torch.randint(0, 256, (2, num_frames, height, width, 3), generator=generator, dtype=torch.uint8)
        mp4s = [encode_mp4(video, fps) for video in videos]
        row = {
            "pair_id": f"prompt-{index:05d}/sample-{2 * index:06d}/sample-{2 * index + 1:06d}",
            "prompt_id": f"prompt-{index:05d}",
            "prompt": prompts[index % len(prompts)],
            "win_sample_id": f"sample-{2 * index:06d}",
            "lose_sample_id": f"sample-{2 * index + 1:06d}",
            "win_score": 0.8,
            "lose_score": 0.6,
            "weight": float(0.5 + torch.rand((), generator=generator)),
            "fps": fps,
        }
        if with_videos:
            row["win_video"], row["lose_video"] = mp4s
        if with_latents:
            frames = torch.stack([decode_mp4(data)[0] for data in mp4s])
            with torch.no_grad():
                latents = model.encode_videos(frames).to(latent_dtype)
            (win, shape, dtype), (lose, _, _) = (tensor_bytes.latents_to_bytes(latent) for latent in latents[:2])
            row.update(win_latents=win, lose_latents=lose, latent_shape=shape, latent_dtype=dtype,
                       latent_model=model.latent_space)
        if with_text_embeddings:  # as the pair stage stores them (also write the empty prompt's: empty_prompt_url)
            with torch.no_grad():
                embedding = model.encode_prompts([row["prompt"]])[0].to(latent_dtype)
            text, shape, dtype = tensor_bytes.latents_to_bytes(embedding)
            row.update(text_embedding=text, text_embedding_shape=shape, text_embedding_dtype=dtype)
        rows.append(row)
    return rows


def write_synthetic_pairs(
    model: VideoDiffusionModel,
    root: str,
    *,
    num_pairs: int,
    pairs_per_shard: int,
    **row_options,
) -> list[ShardInfo]:
    """Write `num_pairs` synthetic pairs as committed pair shards under `root` (shards 0, 1, ...)."""
    infos = []
    for index, begin in enumerate(range(0, num_pairs, pairs_per_shard)):
        count = min(pairs_per_shard, num_pairs - begin)
        rows = synthetic_pair_rows(model, num_pairs=count, first_index=begin, **row_options)
        infos.append(shards.write_shard(shards.make_table("pairs", rows), root, "pairs", index))
    return infos


TINY_VIDEO_SIZES = {"vc2": (4, 16, 16), "t2v_turbo": (4, 16, 16), "cogvideox": (9, 16, 16), "wan": (5, 16, 16)}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m videodpo_ray.training.synthetic ROOT --family vc2`: synthetic pair shards from a tiny model."""
    import argparse

    from videodpo_ray.models import ModelConfig, build_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="output root; shards go to ROOT/pairs/")
    parser.add_argument("--family", choices=sorted(TINY_VIDEO_SIZES), default="vc2")
    parser.add_argument("--num-pairs", type=int, default=16)
    parser.add_argument("--pairs-per-shard", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(ModelConfig(family=args.family, variant="tiny"))
    frames, height, width = TINY_VIDEO_SIZES[args.family]
    infos = write_synthetic_pairs(model, args.root, num_pairs=args.num_pairs, pairs_per_shard=args.pairs_per_shard,
                                  num_frames=frames, height=height, width=width, seed=args.seed)
    print(f"wrote {sum(info.num_rows for info in infos)} pairs in {len(infos)} shard(s) under {args.root}/pairs")


if __name__ == "__main__":
    main()
