"""What a run on storage has committed: `videodpo-ray status RUN` (pure reads, no Ray).

RUN is a pipeline or stage output root (generation, pairing and evaluation under it; training runs under
`{RUN}/train/`) or a training run directory itself. Only committed work counts: shards with their manifests,
checkpoints with their train state.
"""

from __future__ import annotations

import json
from typing import Any

from videodpo_ray import shards, storage
from videodpo_ray.training import checkpoint as ckpt

SHARD_KINDS = ("samples", "scores", "pairs")
LAST_STEP_METRICS = ("loss", "implicit_accuracy", "reward_margin", "mean_weight", "lr", "peak_memory_gib")


def run_status(url: str) -> dict[str, Any]:
    """Committed shards by kind, training runs (checkpoints, export, last step's metrics) and the evaluation."""
    status: dict[str, Any] = {"url": url}
    for kind in SHARD_KINDS:
        committed = shards.list_shards(url, kind)
        if committed:
            status[kind] = {"shards": len(committed), "rows": sum(info.num_rows for info in committed)}
    runs = [url] if _is_run(url) else [e.url for e in storage.list_entries(storage.join(url, "train")) if e.is_dir]
    status["runs"] = {run: training_status(run) for run in runs if _is_run(run)}
    evaluations = [e.url for e in storage.list_entries(storage.join(url, "evaluate")) if e.is_dir]
    status["evaluate"] = {}
    for evaluation in evaluations:  # the pipeline's {out}/evaluate/{run_name}
        try:
            summary = json.loads(storage.read_bytes(storage.join(evaluation, "summary.json")))
        except FileNotFoundError:
            continue
        keys = ("num_prompts", "win_rate", "omniscore_gain_mean")
        status["evaluate"][evaluation] = {key: summary[key] for key in keys}
    return status


def training_status(run_url: str) -> dict[str, Any]:
    """One training run: its committed checkpoint steps, whether it exported, its last logged step's metrics."""
    latest = ckpt.latest_checkpoint_state(run_url)
    scalars = ckpt.read_tensorboard_scalars(run_url)
    last_step = max((step for values in scalars.values() for step in values), default=None)
    return {
        "checkpoint_step": latest[1].global_step if latest else None,
        "total_steps": latest[1].total_steps if latest else None,
        "exported": storage.exists(storage.join(run_url, ckpt.EXPORT_DIR, ckpt.EXPORT_INFO)),
        "last_step": last_step,
        "metrics": {key: scalars[key][last_step] for key in LAST_STEP_METRICS if last_step in scalars.get(key, {})},
    }


def render_status(status: dict[str, Any]) -> str:
    lines = [f"{status['url']}:"]
    for kind in SHARD_KINDS:
        if kind in status:
            lines.append(f"  {kind}: {status[kind]['shards']} shard(s), {status[kind]['rows']} rows committed")
    for run, state in status["runs"].items():
        done = f"checkpoint at step {state['checkpoint_step']}/{state['total_steps']}" if state["checkpoint_step"] \
            else "no committed checkpoint"
        metrics = ", ".join(f"{key} {value:.4g}" for key, value in state["metrics"].items())
        lines.append(f"  run {run}: {done}{'; exported' if state['exported'] else ''}"
                     + (f"; step {state['last_step'] + 1}: {metrics}" if metrics else ""))
    for evaluation, evaluated in status["evaluate"].items():
        lines.append(f"  evaluate {evaluation}: win rate {evaluated['win_rate']:.3f} over {evaluated['num_prompts']} "
                     f"prompts, OmniScore gain {evaluated['omniscore_gain_mean']:+.4f}")
    if len(lines) == 1:
        lines.append("  nothing committed")
    return "\n".join(lines)


def _is_run(url: str) -> bool:
    return any(e.url.rsplit("/", 1)[-1].startswith(ckpt.CHECKPOINT_PREFIX) for e in storage.list_entries(url))
