"""DPO training costs, side by side in one run on the same tiny VideoCrafter2 and the same batch.

1. DPO step / SFT step time: a DPO step = policy forward+backward on winner and loser + a no-grad reference
   forward on both; SFT = forward+backward on the same 2B videos. Theory (backward ~ 2 forwards): 4/3.
2. Peak memory DPO / SFT above the same baseline (model, batch, optimizer states and gradients allocated), each
   mode in a fresh subprocess (CPU: peak RSS sampled during the steps; CUDA: max_memory_allocated).
3. Stored latents vs VAE encoding per step: a training step including its data preparation, reading the same
   pair shards either way (latents from the shard vs decoding the mp4s and encoding them with the VAE).
4. Data-loading stall: the training step on pair shards in S3 (moto server on 127.0.0.1) with the background
   prefetch the train job uses; stall = time the step waited for its batch / step time.

Run: `.venv/bin/python benchmarks/train.py` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from videodpo_ray import shards
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.training.data import PairLoader, pair_latents
from videodpo_ray.training.plan import PairPlan
from videodpo_ray.training.step import dpo_step, sft_step
from videodpo_ray.training.synthetic import write_synthetic_pairs

VIDEO = (8, 32, 32)  # frames, height, width -> tiny VC2 latents (4, 8, 16, 16)
PAIRS = 2  # pairs per batch
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(finetune: str) -> VideoDiffusionModel:
    return build_model(ModelConfig(family="vc2", variant="tiny", finetune=finetune, lora={"rank": 8}), seed=0).to(
        DEVICE
    )


def batch(model: VideoDiffusionModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Winner/loser latents (from random videos through the VAE), prompt embeddings and pair weights."""
    generator = torch.Generator().manual_seed(0)
    videos = torch.randint(0, 256, (2 * PAIRS, *VIDEO, 3), generator=generator, dtype=torch.uint8)
    latents = model.encode_videos(videos.to(DEVICE))
    embeddings = model.encode_prompts(["a red fox runs through snow", "fireworks over a lake"][:PAIRS])
    weights = torch.linspace(0.5, 1.5, PAIRS, device=DEVICE)
    return latents[:PAIRS], latents[PAIRS:], embeddings, weights


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 0.5 ms from /proc/self/statm."""

    def __enter__(self) -> "PeakRSS":
        import ctypes
        import threading

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed setup memory back, so the baseline is what is in use
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def train_step(mode: str, model, optimizer, win, lose, embeddings, weights, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    if mode == "dpo":
        output = dpo_step(model, win, lose, embeddings, weights, beta_dpo=5000.0, generator=generator)
    else:
        output = sft_step(model, torch.cat([win, lose]), torch.cat([embeddings, embeddings]), generator=generator)
    output.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def step_times(finetune: str, repeats: int) -> dict[str, float]:
    """Median DPO and SFT step times, interleaved (DPO, SFT, DPO, ...) so machine load hits both alike."""
    model = build(finetune)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    tensors = batch(model)
    times: dict[str, list[float]] = {"dpo": [], "sft": []}
    for index in range(repeats + 2):
        for mode in ("dpo", "sft"):
            synchronize()
            start = time.perf_counter()
            train_step(mode, model, optimizer, *tensors, seed=index)
            synchronize()
            if index >= 2:  # warm-up
                times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(values) for mode, values in times.items()}


def peak_memory_run(mode: str, finetune: str) -> None:
    """Child process: print the peak memory of 3 steps above the allocated baseline (bytes, JSON)."""
    model = build(finetune)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    tensors = batch(model)
    for parameter in model.trainable_parameters():  # gradients and AdamW states exist before the baseline
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for seed in range(3):
            train_step(mode, model, optimizer, *tensors, seed=seed)
        peak = torch.cuda.max_memory_allocated()
    else:
        with PeakRSS() as rss:
            for seed in range(3):
                train_step(mode, model, optimizer, *tensors, seed=seed)
        baseline, peak = rss.baseline, rss.peak
    print(json.dumps({"mode": mode, "extra_bytes": peak - baseline}))


def peak_memory(mode: str, finetune: str) -> int:
    output = subprocess.run(
        [sys.executable, __file__, "--memory-run", mode, finetune], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["extra_bytes"]


def loader_steps(model, plan: PairPlan, *, stored: bool, prefetch: int, steps: int) -> dict[str, float]:
    """Time `steps` DPO training steps fed by PairLoader (after one warm-up step); returns step time and stall."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    embeddings = model.encode_prompts(["a cat sleeps on a sofa"] * PAIRS)
    loader = iter(
        PairLoader(
            plan,
            epoch=0,
            rank=0,
            start_step=0,
            latent_family=model.family,
            use_stored_latents=stored,
            prefetch=prefetch,
        )
    )
    waited = prepared = total = 0.0
    for index in range(steps + 1):
        start = time.perf_counter()
        micro_batch = next(loader)
        got = time.perf_counter()
        win, lose = pair_latents(model, micro_batch, DEVICE)
        weights = torch.tensor([pair.weight for pair in micro_batch.pairs], device=DEVICE)
        synchronize()
        ready = time.perf_counter()
        train_step("dpo", model, optimizer, win, lose, embeddings, weights, seed=index)
        synchronize()
        if index > 0:
            waited += got - start
            prepared += ready - start
            total += time.perf_counter() - start
    loader.close()
    return {"step_s": total / steps, "prep_s": prepared / steps, "stall": waited / total}


def moto_bucket() -> str:
    """A moto S3 server on 127.0.0.1 (env set so pyarrow / s3fs find it) and a fresh bucket."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket="bench-train")
    return "s3://bench-train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-run", nargs=2, metavar=("MODE", "FINETUNE"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--loader-steps", type=int, default=12)
    args = parser.parse_args()
    if args.memory_run:
        peak_memory_run(*args.memory_run)
        return

    print(
        f"tiny VideoCrafter2, {PAIRS} pairs per step, videos {VIDEO[0]}x{VIDEO[1]}x{VIDEO[2]}, device {DEVICE}, "
        f"{torch.get_num_threads()} threads"
    )
    print("\n1-2. DPO vs SFT on the same model and batch (median of interleaved steps; memory above baseline)")
    print(
        f"{'finetune':<9} {'DPO step s':>10} {'SFT step s':>10} {'time DPO/SFT':>12} {'mem DPO MB':>10} "
        f"{'mem SFT MB':>10} {'mem DPO/SFT':>11}"
    )
    for finetune in ("full", "lora"):
        times = step_times(finetune, args.repeats)
        memory = {mode: peak_memory(mode, finetune) for mode in ("dpo", "sft")}
        print(
            f"{finetune:<9} {times['dpo']:>10.4f} {times['sft']:>10.4f} {times['dpo'] / times['sft']:>12.3f} "
            f"{memory['dpo'] / 2**20:>10.1f} {memory['sft'] / 2**20:>10.1f} {memory['dpo'] / memory['sft']:>11.3f}"
        )
    print(
        "   (time: floor 4/3 = 1.333 when backward = 2 forwards, target <= 1.45; memory: the baseline holds the\n"
        "   weights, incl. the frozen reference copy of a full finetune; a LoRA reference costs no weights)"
    )

    model = build("full")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as directory:
        write_synthetic_pairs(
            model,
            directory,
            num_pairs=(args.loader_steps + 1) * PAIRS,
            pairs_per_shard=8,
            num_frames=VIDEO[0],
            height=VIDEO[1],
            width=VIDEO[2],
        )
        plan = PairPlan(
            shards.list_shards(directory, "pairs"), seed=0, num_workers=1, pairs_per_worker=PAIRS, grad_accum=1
        )
        stored = loader_steps(model, plan, stored=True, prefetch=0, steps=args.loader_steps)
        encoded = loader_steps(model, plan, stored=False, prefetch=0, steps=args.loader_steps)
    print("\n3. Training step with its data preparation (no prefetch), same shards")
    print(f"   {'':<22} {'step s':>8} {'data prep s':>12}")
    for name, timing in (("stored latents", stored), ("VAE encode per step", encoded)):
        print(f"   {name:<22} {timing['step_s']:>8.4f} {timing['prep_s']:>12.4f}")
    print(
        f"   speedup of stored latents: step {encoded['step_s'] / stored['step_s']:.2f}x, "
        f"data prep {encoded['prep_s'] / stored['prep_s']:.1f}x (the tiny VAE is cheap; at 16x320x512 it is not)"
    )

    bucket = moto_bucket()
    write_synthetic_pairs(
        model,
        bucket,
        num_pairs=(args.loader_steps + 1) * PAIRS,
        pairs_per_shard=8,
        num_frames=VIDEO[0],
        height=VIDEO[1],
        width=VIDEO[2],
        with_videos=False,
    )
    plan = PairPlan(shards.list_shards(bucket, "pairs"), seed=0, num_workers=1, pairs_per_worker=PAIRS, grad_accum=1)
    no_prefetch = loader_steps(model, plan, stored=True, prefetch=0, steps=args.loader_steps)
    prefetched = loader_steps(model, plan, stored=True, prefetch=2, steps=args.loader_steps)
    print("\n4. Data-loading stall on S3 (moto) shards, stored latents")
    print(
        f"   no prefetch: stall {no_prefetch['stall']:.1%} of {no_prefetch['step_s']:.4f} s/step; "
        f"prefetch 2 (train job default): stall {prefetched['stall']:.1%} of {prefetched['step_s']:.4f} s/step "
        f"(target < 5%)"
    )


if __name__ == "__main__":
    main()
