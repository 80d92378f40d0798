"""What a run on storage has committed: `videodpo-ray status RUN` (pure reads, no Ray).

RUN is a pipeline or stage output root (generation, pairing and evaluation under it; training runs under
`{RUN}/train/`), a training run directory itself, or a standalone evaluate output (`summary.json`, `base/`,
`tuned/`). Only committed work counts: shards with their manifests, checkpoints with their train state, an
evaluation's summary (before it has one: each side's committed scores shards). A RUN that does not exist says so.
"""

from __future__ import annotations

import json
from typing import Any

from videodpo_ray import shards, storage
from videodpo_ray.stages.evaluate import MODELS, SUMMARY
from videodpo_ray.stages.evaluate_report import format_number, unscored_note
from videodpo_ray.training import checkpoint as ckpt

SHARD_KINDS = ("samples", "scores", "pairs")
LAST_STEP_METRICS = ("loss", "implicit_accuracy", "reward_margin", "mean_weight", "lr", "peak_memory_gib")
SUMMARY_KEYS = ("num_prompts", "num_prompts_unscored", "win_rate", "omniscore_gain_mean")


def run_status(url: str) -> dict[str, Any]:
    """Committed shards by kind, training runs (checkpoints, export, last step's metrics) and the evaluations: `url`
    itself (a standalone evaluate output) and the pipeline's `{url}/evaluate/{run_name}`."""
    status: dict[str, Any] = {"url": url, "exists": storage.exists(url), "runs": {}, "evaluate": {}}
    if not status["exists"]:
        return status
    status.update(shard_counts(url))
    runs = [url] if _is_run(url) else [e.url for e in storage.list_entries(storage.join(url, "train")) if e.is_dir]
    status["runs"] = {run: training_status(run) for run in runs if _is_run(run)}
    evaluations = [url, *(e.url for e in storage.list_entries(storage.join(url, "evaluate")) if e.is_dir)]
    for evaluation in evaluations:
        evaluated = evaluation_status(evaluation)
        if evaluated is not None:
            status["evaluate"][evaluation] = evaluated
    return status


def shard_counts(url: str) -> dict[str, dict[str, int]]:
    """{kind: {"shards", "rows"}} of the committed shards directly under `url`, for the kinds it has."""
    counts = {}
    for kind in SHARD_KINDS:
        committed = shards.list_shards(url, kind)
        if committed:
            counts[kind] = {"shards": len(committed), "rows": sum(info.num_rows for info in committed)}
    return counts


def evaluation_status(url: str) -> dict[str, Any] | None:
    """An evaluate output's summary headline (None before it is written) and each side's committed scores shards;
    None when `url` is not an evaluate output (neither a summary nor a side's scores)."""
    sides = {which: shard_counts(storage.join(url, which)).get("scores") for which in MODELS}
    try:
        summary = json.loads(storage.read_bytes(storage.join(url, SUMMARY)))
    except FileNotFoundError:
        summary = None
    if summary is None and not any(sides.values()):
        return None
    return {"summary": {key: summary.get(key) for key in SUMMARY_KEYS} if summary else None, "sides": sides}


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
    if not status["exists"]:
        return "\n".join([*lines, "  nothing committed: no such file or directory (check the path)"])
    for kind in SHARD_KINDS:
        if kind in status:
            lines.append(f"  {kind}: {status[kind]['shards']} shard(s), {status[kind]['rows']} rows committed")
    for run, state in status["runs"].items():
        done = f"checkpoint at step {state['checkpoint_step']}/{state['total_steps']}" if state["checkpoint_step"] \
            else "no committed checkpoint"
        metrics = ", ".join(f"{key} {value:.4g}" for key, value in state["metrics"].items())
        lines.append(f"  run {run}: {done}{'; exported' if state['exported'] else ''}"
                     + (f"; step {state['last_step'] + 1}: {metrics}" if metrics else ""))
    lines += [f"  evaluate {evaluation}: {_evaluation_line(evaluated)}" for evaluation, evaluated in
              status["evaluate"].items()]
    if len(lines) == 1:
        lines.append("  nothing committed")
    return "\n".join(lines)


def _evaluation_line(evaluated: dict[str, Any]) -> str:
    summary = evaluated["summary"]
    if summary is None:
        sides = ", ".join(f"{which} {counts['rows'] if counts else 0} scored sample(s)"
                          for which, counts in evaluated["sides"].items())
        return f"not summarised yet ({sides} committed)"
    return (f"win rate {format_number(summary['win_rate'], 3)} over {summary['num_prompts']} prompts"
            + unscored_note(summary["num_prompts_unscored"])
            + f", OmniScore gain {format_number(summary['omniscore_gain_mean'], sign=True)}")


def _is_run(url: str) -> bool:
    return any(e.url.rsplit("/", 1)[-1].startswith(ckpt.CHECKPOINT_PREFIX) for e in storage.list_entries(url))
