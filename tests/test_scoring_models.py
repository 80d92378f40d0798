"""Model-based scorers on tiny random-init models: preprocessing on exact tensors, each formula against an independent
computation from the same model, batching, and strict loading of the original checkpoint layouts."""

from __future__ import annotations

import math
import pickle

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from videodpo_ray.config import build_config
from videodpo_ray.errors import ConfigError, WeightsError
from videodpo_ray.scoring import (
    DIMENSIONS,
    ModelSpec,
    ScorerConfig,
    aesthetic_quality,
    background_consistency,
    clip_score,
    dimension_module,
    dynamic_degree,
    load_scorer_model,
    resolve_dtype,
    score_outputs,
    subject_consistency,
    temporal_flickering,
)
from videodpo_ray.scoring.clip import full_clip, load_image_tower
from videodpo_ray.scoring.preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_transform,
    dino_transform,
    encode_in_batches,
    frames_to_tensor,
    sample_middle,
)
from videodpo_ray.scoring.weights import load_filtered, load_state_dict

RNG = np.random.default_rng(0)


def random_video(frames: int, height: int, width: int) -> np.ndarray:
    """A smooth-ish random video: a random image drifting a little per frame (so consistencies are not trivial)."""
    base = RNG.integers(0, 256, (height, width, 3)).astype(np.int16)
    noise = RNG.integers(-40, 41, (frames, height, width, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def tiny(name: str):
    return load_scorer_model(name, ModelSpec(tiny=True))


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def vbench_consistency(features: torch.Tensor) -> float:
    """VBench's loop, written independently of videodpo_ray.scoring.consistency."""
    features = F.normalize(features.double(), dim=-1)
    total = 0.0
    for i in range(1, len(features)):
        to_previous = max(0.0, F.cosine_similarity(features[i - 1 : i], features[i : i + 1]).item())
        to_first = max(0.0, F.cosine_similarity(features[:1], features[i : i + 1]).item())
        total += (to_previous + to_first) / 2
    return total / (len(features) - 1)


# --- preprocessing --------------------------------------------------------------------------------------------
def test_frames_become_float_0_255_channels_first():
    frames = RNG.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    tensor = frames_to_tensor(frames)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 3, 5, 7)
    assert torch.equal(tensor, torch.from_numpy(frames).permute(0, 3, 1, 2).float())


@pytest.mark.parametrize(("height", "width"), [(48, 80), (81, 50)])
def test_clip_transform_is_bicubic_short_side_224_center_crop_clip_normalised(height, width):
    x = torch.from_numpy(RNG.integers(0, 256, (2, 3, height, width))).float()
    short, long = min(height, width), max(height, width)
    long_resized = int(224 * long / short)  # torchvision Resize(224)
    size = (224, long_resized) if height < width else (long_resized, 224)
    resized = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
    offset = int(round((long_resized - 224) / 2.0))  # torchvision CenterCrop
    cropped = resized[:, :, :, offset : offset + 224] if height < width else resized[:, :, offset : offset + 224, :]
    expected = normalise(cropped / 255.0, CLIP_MEAN, CLIP_STD)
    actual = clip_transform(x)
    assert actual.shape == (2, 3, 224, 224)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    # unrounded float path: resized values are not integers
    assert not torch.equal(resized, resized.round())
    # the check can fail: antialiasing or bilinear would give other values
    antialiased = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    assert (antialiased - resized).abs().max() > 1.0


def test_dino_transform_is_bilinear_short_side_224_no_crop_imagenet_normalised():
    x = torch.from_numpy(RNG.integers(0, 256, (2, 3, 40, 72))).float()
    expected = normalise(
        F.interpolate(x, size=(224, 403), mode="bilinear", align_corners=False, antialias=False) / 255.0,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    actual = dino_transform(x)
    assert actual.shape == (2, 3, 224, 403)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_middle_sampling_takes_the_middle_of_equal_intervals():
    frames = np.arange(16)[:, None, None, None] * np.ones((1, 1, 1, 3), np.uint8)
    # linspace(0, 16, 9) = 0, 2, ..., 16 -> (s + e - 1) // 2 = 0, 2, ..., 14
    assert sample_middle(frames.astype(np.uint8), 8)[:, 0, 0, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    # linspace(0, 10, 5) = 0, 2.5, 5, 7.5, 10 -> ints 0, 2, 5, 7, 10 -> 0, 3, 5, 8
    assert sample_middle(frames[:10].astype(np.uint8), 4)[:, 0, 0, 0].tolist() == [0, 3, 5, 8]


def test_encode_in_batches_fills_batches_across_inputs_and_keeps_order():
    calls = []

    def encode(items: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(items.shape))
        return items * 2

    inputs = [torch.full((3, 2), 1.0), torch.full((4, 5), 2.0), torch.full((6, 2), 3.0)]
    outputs = encode_in_batches(iter(inputs), encode, batch_size=4)
    assert [output.tolist() for output in outputs] == [(tensor * 2).tolist() for tensor in inputs]
    # items of (2,) from inputs 0 and 2 share batches; (5,) items get their own
    assert calls == [(4, 5), (4, 2), (4, 2), (1, 2)]


# --- formulas on tiny models ----------------------------------------------------------------------------------
def dino_original_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """facebookresearch/dino VisionTransformer.interpolate_pos_encoding (its `w` is the height, as there)."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = height // patch + 0.1, width // patch + 0.1
    patch_pos = F.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    return torch.cat((pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def dino_original_cls(model, images: torch.Tensor) -> torch.Tensor:
    """CLS feature as the original DINO ViT computes it (strided conv drops the remainder, DINO pos-embed)."""
    tokens = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(images), -1, -1), tokens], dim=1)
    tokens = tokens + dino_original_pos_encoding(model.pos_embed, *images.shape[-2:], patch=16)
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 0]


def test_subject_consistency_equals_vbench_on_original_dino_features():
    model = tiny("subject_consistency")
    with torch.no_grad():  # unit-scale position embeddings, so that how they are interpolated shows in the score
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=torch.Generator().manual_seed(2)))
    video = random_video(6, 40, 72)  # -> 224 x 403: a 14 x 25 grid, 3 columns of pixels dropped
    with torch.inference_mode():
        features = dino_original_cls(model, dino_transform(frames_to_tensor(video)))
    torch.testing.assert_close(subject_consistency.frame_features([video], model)[0], features, rtol=0, atol=1e-6)
    assert subject_consistency.score(video, model) == pytest.approx(vbench_consistency(features), abs=1e-6)
    other = random_video(5, 48, 48)  # square: no interpolation
    scores = subject_consistency.score_batch([video, other, video[:3]], model)
    assert scores == pytest.approx([subject_consistency.score(v, model) for v in (video, other, video[:3])], abs=1e-6)


def test_background_consistency_equals_vbench_on_clip_embeddings():
    model = tiny("background_consistency")
    video = random_video(5, 36, 60)
    with torch.inference_mode():
        embeddings = model(pixel_values=clip_transform(frames_to_tensor(video))).image_embeds
    assert background_consistency.score(video, model) == pytest.approx(vbench_consistency(embeddings), abs=1e-6)
    other = random_video(4, 50, 30)
    assert background_consistency.score_batch([video, other], model) == pytest.approx(
        [background_consistency.score(video, model), background_consistency.score(other, model)], abs=1e-6
    )


def test_aesthetic_quality_is_mean_head_on_normalised_embedding_over_10():
    model = tiny("aesthetic_quality")
    video = random_video(4, 40, 40)
    with torch.inference_mode():
        embeddings = model.clip(pixel_values=clip_transform(frames_to_tensor(video))).image_embeds
        unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
        expected = (unit @ model.head.weight.T + model.head.bias).squeeze(-1).div(10).mean().item()
    assert aesthetic_quality.score(video, model) == pytest.approx(expected, abs=1e-6)
    assert aesthetic_quality.score_batch([video, video[:2]], model) == pytest.approx(
        [expected, aesthetic_quality.score(video[:2], model)], abs=1e-6
    )


def test_clip_score_is_mean_frame_text_cosine():
    model = tiny("clip_score")
    video = random_video(3, 32, 48)
    with torch.inference_mode():
        images = model.get_image_features(pixel_values=clip_transform(frames_to_tensor(video))).pooler_output
        text = model.get_text_features(input_ids=open_clip.tokenize(["a red fox"])).pooler_output
    expected = F.cosine_similarity(images, text).mean().item()
    assert clip_score.score(video, model, prompt="a red fox") == pytest.approx(expected, abs=1e-6)
    scores = clip_score.score_batch([video, video], model, prompts=["a red fox", "a blue car"])
    assert scores[0] == pytest.approx(expected, abs=1e-6) and scores[1] != pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="prompt"):
        clip_score.score(video, model)


def vbench_top_magnitude(flow: torch.Tensor) -> float:
    """VBench DynamicDegree.get_score on one flow (2, H, W)."""
    u, v = flow[0].numpy(), flow[1].numpy()
    rad = np.sqrt(np.square(u) + np.square(v))
    h, w = rad.shape
    return float(np.mean(abs(np.sort(-rad.flatten()))[: int(h * w * 0.05)]))


def test_dynamic_degree_runs_raft_on_8fps_pairs_padded_like_vbench():
    model = tiny("dynamic_degree")
    video = random_video(7, 60, 76)  # fps 24 -> every 3rd frame: 0, 3, 6 -> 2 pairs; padded to 64 x 80
    expected = []
    with torch.inference_mode():
        for first, second in [(0, 3), (3, 6)]:
            pair = frames_to_tensor(video[[first, second]])
            pair = F.pad(pair, [2, 2, 2, 2], mode="replicate")
            pair = 2 * (pair / 255.0) - 1
            flow = model(pair[:1], pair[1:], num_flow_updates=20)[-1]  # torchvision's own forward
            expected.append(vbench_top_magnitude(flow[0]))
        motions = dynamic_degree.pair_motion(model, dynamic_degree.sampled_pairs(video, 24, torch.device("cpu")))
    np.testing.assert_allclose(motions.numpy(), expected, rtol=1e-5)
    outputs = dynamic_degree.score_outputs_batch([video, video[:4]], model, fps=[24, 8])
    assert outputs[0] == dynamic_degree.motion_outputs(motions.tolist(), 60, 76)
    assert set(outputs[1]) == {"dynamic_degree", "dynamic_degree_vbench"}
    assert dynamic_degree.score(video, model, fps=24) == outputs[0]["dynamic_degree"]
    with pytest.raises(ValueError, match="frame rate"):
        dynamic_degree.score(video, model)


def test_score_outputs_lists_every_output_of_a_dimension():
    video = random_video(4, 64, 64)
    expected = [{"temporal_flickering": temporal_flickering.score(video)}]
    assert score_outputs("temporal_flickering", [video], None) == expected
    [outputs] = score_outputs("dynamic_degree", [video], tiny("dynamic_degree"), fps=[8])
    assert set(outputs) == {"dynamic_degree", "dynamic_degree_vbench"}


# --- loading --------------------------------------------------------------------------------------------------
def dino_checkpoint_layout(depth: int, dim: int, hidden: int, patches: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of facebookresearch/dino's VisionTransformer(num_classes=0) state dict (patch 16)."""
    layout = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, patches + 1, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        layout |= {
            f"blocks.{i}.norm1.weight": (dim,),
            f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
            f"blocks.{i}.attn.qkv.bias": (3 * dim,),
            f"blocks.{i}.attn.proj.weight": (dim, dim),
            f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.norm2.weight": (dim,),
            f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, dim),
            f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (dim, hidden),
            f"blocks.{i}.mlp.fc2.bias": (dim,),
        }
    return layout


def test_dino_vit_b16_matches_the_original_checkpoint_layout():
    model = subject_consistency.build_model(subject_consistency.VIT_BASE_PATCH16_224)
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert actual == dino_checkpoint_layout(depth=12, dim=768, hidden=3072, patches=196)


def test_dino_loader_reads_the_original_layout_and_rejects_other_keys(tmp_path):
    layout = dino_checkpoint_layout(depth=1, dim=24, hidden=48, patches=196)
    generator = torch.Generator().manual_seed(1)
    state = {key: torch.randn(shape, generator=generator) for key, shape in layout.items()}
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(state, path)
    model = subject_consistency.load_dino(str(path), subject_consistency.TINY)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())

    broken = dict(state)
    del broken["norm.bias"]
    broken["head.weight"] = torch.zeros(10, 24)
    broken["pos_embed"] = torch.zeros(1, 50, 24)
    torch.save(broken, path)
    with pytest.raises(WeightsError) as error:
        subject_consistency.load_dino(str(path), subject_consistency.TINY)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys (1): norm.bias" in message
    assert "unexpected keys (1): head.weight" in message
    assert "pos_embed (1, 50, 24) != (1, 197, 24)" in message


def test_clip_image_tower_loads_from_a_full_hf_clip_checkpoint(tmp_path):
    full = full_clip("tiny/32")
    state = dict(full.state_dict())
    state["vision_model.embeddings.position_ids"] = torch.arange(50)[None]  # saved by older transformers
    (tmp_path / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip" / "model.safetensors"))
    tower = load_image_tower("tiny/32", str(tmp_path / "clip")).eval()  # a folder: its model.safetensors
    pixels = clip_transform(frames_to_tensor(random_video(2, 32, 32)))
    with torch.inference_mode():
        torch.testing.assert_close(
            tower(pixel_values=pixels).image_embeds, full.eval().get_image_features(pixel_values=pixels).pooler_output
        )
    del state["visual_projection.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip" / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys \(1\): visual_projection.weight"):
        load_image_tower("tiny/32", str(tmp_path / "clip"))


def test_raft_large_and_laion_head_load_from_files_and_urls(tmp_path):
    from torchvision.models.optical_flow import raft_large

    state = raft_large().state_dict()
    torch.save(state, tmp_path / "raft_large_C_T_V1-22a6c225.pth")
    loaded = dynamic_degree.load_model(ModelSpec(weights=f"file://{tmp_path}/raft_large_C_T_V1-22a6c225.pth"))
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())

    import fsspec

    head = {"weight": torch.randn(1, 768), "bias": torch.randn(1)}
    with fsspec.open("memory://weights/sa_0_4_vit_l_14_linear.pth", "wb") as file:
        torch.save(head, file)
    loaded_head = aesthetic_quality.load_head("memory://weights/sa_0_4_vit_l_14_linear.pth")
    assert torch.equal(loaded_head.weight, head["weight"]) and torch.equal(loaded_head.bias, head["bias"])
    torch.save({"weight": torch.randn(1, 512), "bias": torch.randn(1)}, tmp_path / "head.pth")
    with pytest.raises(WeightsError, match=r"weight \(1, 512\) != \(1, 768\)"):
        aesthetic_quality.load_head(str(tmp_path / "head.pth"))


class NotATensor:
    pass


def test_weights_are_read_without_unpickling_code(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as file:
        pickle.dump({"weight": NotATensor()}, file, protocol=2)
    with pytest.raises(WeightsError, match="evil.pth: not a safetensors / torch weights file"):
        load_state_dict(str(tmp_path / "evil.pth"))
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_state_dict(str(tmp_path / "absent.pth"))
    with pytest.raises(WeightsError, match="no weights location"):
        load_state_dict(None)
    with pytest.raises(WeightsError, match="none of model.safetensors"):
        load_state_dict(str(tmp_path))


def test_load_strict_lists_every_problem():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(WeightsError) as error:
        load_filtered(model, {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, "somewhere.pth")
    assert "missing keys (1): bias" in str(error.value)
    assert "unexpected keys (1): extra" in str(error.value)
    assert "weight (2, 4) != (2, 3)" in str(error.value)


# --- registry and config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DIMENSIONS))
def test_every_dimension_module_follows_the_contract(name):
    module = dimension_module(name)
    assert module.NAME == name
    assert all(info.licence and info.source for info in module.MODELS)
    assert isinstance(module.CUDA_DTYPE, torch.dtype)
    for function in ("load_model", "tiny_model", "score", "score_batch"):
        assert callable(getattr(module, function)), function


def test_scorer_config_validates_dimensions_and_weights():
    with pytest.raises(ConfigError, match="unknown dimension.*sharpness"):
        build_config(ScorerConfig, {"dimensions": ["sharpness"]})
    with pytest.raises(ConfigError, match="no weights for subject_consistency, motion_smoothness"):
        build_config(
            ScorerConfig,
            {
                "models": {
                    "dynamic_degree": {"weights": "raft.pth"},
                    "aesthetic_quality": {"weights": "a", "head": "h"},
                    "imaging_quality": {"weights": "m"},
                    "overall_consistency": {"weights": "v"},
                }
            },
        )
    with pytest.raises(ConfigError, match="not in `dimensions`"):
        build_config(ScorerConfig, {"dimensions": ["temporal_flickering"], "models": {"clip_score": {"tiny": True}}})
    assert build_config(ScorerConfig, {"dimensions": ["temporal_flickering"]}).dimensions == ["temporal_flickering"]
    config = build_config(ScorerConfig, {"tiny": True, "models": {"dynamic_degree": {"weights": "raft.pth"}}})
    assert config.spec("dynamic_degree").tiny and config.spec("subject_consistency").tiny


def test_models_run_float32_on_cpu_and_vbench_dtypes_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", cuda, background_consistency.CUDA_DTYPE) == torch.float16
    assert resolve_dtype("auto", cuda, subject_consistency.CUDA_DTYPE) == torch.float32
    assert resolve_dtype("bfloat16", cuda, torch.float16) == torch.bfloat16
    assert resolve_dtype("float16", cpu, torch.float16) == torch.float32
    model = load_scorer_model("aesthetic_quality", ModelSpec(tiny=True))
    assert not model.training and all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
