"""Generate + Score at scale on a CPU box: driver memory, pipeline overhead and actor scaling.

The real pipeline (`jobs.generate.generate`: Ray Data, chunk collection, shard commits, progress lines, manifests)
runs with a stub sampler and a stub scorer in place of the models:
- `StubSampler`: deterministic frames (one of 8 clips, by seed), encoded once; `--sample-ms` of simulated model
  time per video (a sleep: it leaves the CPUs to the pipeline, as a GPU sampler does);
- `StubScorer`: model-free, a deterministic score per sample id, `--score-ms` per video.

Measured, each configuration in a fresh driver process (one local Ray cluster each, 2 CPUs):
1. driver peak RSS at `--small` and `--large` prompts (flat: within 1.5x), the per-video pipeline overhead and the
   time extrapolated to 1M prompts;
2. pipeline throughput / a bare Python loop calling the same stubs on the same chunks (one actor each), end to end
   (with the pipeline's ~10 s start: Ray Data, actor processes and their imports) and in steady state (the marginal
   rate between the small and the large run, where the start cancels);
3. the 1 -> 2 sampler actor scaling factor at `--small` prompts (end to end).

Run: `.venv/bin/python benchmarks/generate.py` (about 15 minutes on 2 CPU cores); results go in RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SAMPLES_PER_PROMPT = 2
CLIPS = 8


class StubSampler:
    """Behaves like `actors.sampler.SamplerActor` (same constructor, same output columns) without a model."""

    sample_ms = 0.0  # simulated model time per video (set on a subclass: the constructor is SamplerActor's)

    def __init__(self, model: Any, sampling: Any, init_seed: int = 0, tuned_export: str | None = None,
                 gif: bool = False, max_attempts: int = 2, batch_size: int | None = None) -> None:
        from videodpo_ray.video import encode_mp4

        self.fps = sampling.fps
        frames = np.random.default_rng(0).integers(0, 256, (CLIPS, 4, 16, 16, 3), dtype=np.uint8)
        self.clips = [encode_mp4(clip, fps=self.fps) for clip in frames]

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(self.sample_ms / 1000 * batch.num_rows)
        seeds = batch.column("seed").to_pylist()
        rows = batch.num_rows
        batch = batch.append_column("video", pa.array([self.clips[seed % CLIPS] for seed in seeds], pa.binary()))
        batch = batch.append_column("fps", pa.array([self.fps] * rows, pa.int32()))
        batch = batch.append_column("model", pa.array(["stub"] * rows, pa.string()))
        batch = batch.append_column("failed_reason", pa.nulls(rows, pa.string()))
        return batch.append_column("attempts", pa.array([1] * rows, pa.int32()))


class StubScorer:
    """Behaves like `actors.scorer.OmniScorer` for the configured (model-free) dimensions: a score from the id."""

    score_ms = 0.0  # simulated scoring time per video (set on a subclass)

    def __init__(self, config: Any, batch_size: int | None = None) -> None:
        self.dimensions = list(config.dimensions)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["sample_id"])
        time.sleep(self.score_ms / 1000 * count)
        digests = [hashlib.sha256(str(sample_id).encode()).digest() for sample_id in batch["sample_id"]]
        values = np.array([int.from_bytes(digest[:4], "little") / 2**32 for digest in digests])
        return {**batch, **{name: values for name in self.dimensions}, "omniscore": values,
                "failed_reason": np.array([None] * count, dtype=object)}


def stubs(sample_ms: float, score_ms: float) -> tuple[type, type]:
    """The stub classes with these simulated model times."""
    return (type("Sampler", (StubSampler,), {"sample_ms": sample_ms}),
            type("Scorer", (StubScorer,), {"score_ms": score_ms}))


def config(out: str, actors: int) -> Any:
    from videodpo_ray.stages.generate import GenerateConfig

    return GenerateConfig(
        prompts="unused", out=out, samples_per_prompt=SAMPLES_PER_PROMPT, prompts_per_chunk=64,
        sampling={"num_frames": 4, "height": 16, "width": 16, "fps": 8},
        scorer={"dimensions": ["temporal_flickering"], "omniscore": {"quality": ["temporal_flickering"],
                                                                     "semantic": ["temporal_flickering"]}},
        sampler_pool={"min_actors": actors, "max_actors": actors, "batch_size": 16, "num_cpus": 0.5},
        scorer_pool={"batch_size": 64, "num_cpus": 0.5, "num_gpus": 0},
    )


def prompts(count: int) -> list[Any]:
    from videodpo_ray.stages.prompts import prompt_rows

    return prompt_rows([f"prompt number {i}: a {i % 7} coloured shape moving {i % 4}" for i in range(count)])


def run_pipeline(count: int, actors: int, sample_ms: float, score_ms: float) -> dict[str, float]:
    """One generate run in this (fresh) process: wall time and this driver's peak RSS."""
    import ray

    from jobs.common import connect_ray
    from jobs.generate import generate

    rows = prompts(count)
    connect_ray(num_cpus=2)
    sampler, scorer = stubs(sample_ms, score_ms)
    with tempfile.TemporaryDirectory(prefix="videodpo-bench-") as out:
        started = time.perf_counter()
        report = generate(config(out, actors), prompts=rows, sampler_class=sampler, scorer_class=scorer)
        seconds = time.perf_counter() - started
    ray.shutdown()
    assert len(report.sampled) == report.num_chunks, report.summary()
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_bare_loop(count: int, sample_ms: float, score_ms: float) -> dict[str, float]:
    """The same stubs called in a plain loop over the same request batches (no Ray, no shards)."""
    from videodpo_ray.stages.generate import chunk_prompts, request_blocks

    settings = config("unused", 1)
    sampler_class, scorer_class = stubs(sample_ms, score_ms)
    sampler, scorer = sampler_class(None, settings.sampling), scorer_class(settings.scorer)
    started = time.perf_counter()
    blocks = request_blocks(settings, chunk_prompts(prompts(count), settings.prompts_per_chunk))
    for block in blocks:  # one chunk each
        sampled = sampler(block)
        scorer({name: sampled.column(name).to_numpy(zero_copy_only=False) for name in sampled.column_names})
    return {"seconds": time.perf_counter() - started}


def in_subprocess(kind: str, count: int, actors: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--one", kind, str(count), str(actors),
               "--sample-ms", str(args.sample_ms), "--score-ms", str(args.score_ms)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {count} x {actors}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--sample-ms", type=float, default=2.0)
    parser.add_argument("--score-ms", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=3, metavar=("KIND", "PROMPTS", "ACTORS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, count, actors = args.one[0], int(args.one[1]), int(args.one[2])
        run = run_bare_loop(count, args.sample_ms, args.score_ms) if kind == "bare" else run_pipeline(
            count, actors, args.sample_ms, args.score_ms)
        print(json.dumps(run))
        return

    results: dict[str, Any] = {"sample_ms": args.sample_ms, "score_ms": args.score_ms,
                               "samples_per_prompt": SAMPLES_PER_PROMPT}
    for name, kind, count, actors in [("bare", "bare", args.small, 1), ("small", "ray", args.small, 1),
                                      ("small_2_actors", "ray", args.small, 2), ("large", "ray", args.large, 1)]:
        results[name] = {"prompts": count, "actors": actors, **in_subprocess(kind, count, actors, args)}
        print(name, results[name], flush=True)
    small, large = results["small"], results["large"]
    videos = {name: results[name]["prompts"] * SAMPLES_PER_PROMPT for name in ("bare", "small", "large")}
    marginal_s = (large["seconds"] - small["seconds"]) / (videos["large"] - videos["small"])  # per video, no start
    results["rss_large_over_small"] = large["peak_rss_mib"] / small["peak_rss_mib"]
    results["overhead_ms_per_video"] = 1000 * marginal_s - args.sample_ms  # beyond the sampler's (the bottleneck)
    results["start_s"] = small["seconds"] - marginal_s * videos["small"]
    results["extrapolated_1m_prompts_h"] = (results["start_s"] + marginal_s * 1_000_000 * SAMPLES_PER_PROMPT) / 3600
    bare_s = results["bare"]["seconds"] / videos["bare"]
    results["throughput_vs_bare_loop"] = {"end_to_end": results["bare"]["seconds"] / small["seconds"],
                                          "steady_state": bare_s / marginal_s}
    results["scaling_1_to_2_actors"] = small["seconds"] / results["small_2_actors"]["seconds"]
    for key in ("rss_large_over_small", "overhead_ms_per_video", "start_s", "extrapolated_1m_prompts_h",
                "throughput_vs_bare_loop", "scaling_1_to_2_actors"):
        print(f"{key}: {results[key]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
