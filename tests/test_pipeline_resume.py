"""The pipeline killed at its stage boundaries resumes without redoing committed work (slow: three driver runs).

The driver (`python -m jobs.pipeline`, its own local Ray cluster) is SIGKILLed right after the pair stage commits
(the generate -> train boundary), then, rerun, right after training exports (the train -> evaluate boundary); a
third run finishes. Each rerun must skip what the killed run committed: no chunk sampled again, no pair shard
written again, no optimizer step taken again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipeline import TINY_CONFIG, TINY_OVERRIDES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
def run_pipeline(out: Path, kill_after: str | None = None) -> str:
    """Run the tiny pipeline in a fresh driver; SIGKILL its process group on the first line containing
    `kill_after`. Returns everything it printed."""
    command = [sys.executable, "-m", "jobs.pipeline", str(TINY_CONFIG), f"out={out}", *TINY_OVERRIDES]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if kill_after is not None and kill_after in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=600)
    output = "".join(lines)
    if kill_after is None:
        assert process.returncode == 0, output
    else:
        assert kill_after in output, output
    return output


def test_pipeline_killed_at_each_stage_boundary_resumes_without_redoing_work(tmp_path: Path):
    out = tmp_path / "run"
    first = run_pipeline(out, kill_after="pair -> ")  # pairs committed, training not started
    assert "2 sampled and committed" in first and not (out / "train" / "dpo").exists()

    second = run_pipeline(out, kill_after="[train dpo] finished")  # trained and exported, evaluation not started
    assert "0 sampled and committed, 0 re-scored and committed, 2 already committed and skipped" in second
    assert "0 shard(s) written, " in second
    assert "[train dpo] step 1/2" in second and not (out / "evaluate").exists()

    third = run_pipeline(out)
    assert "2 already committed and skipped" in third and "0 shard(s) written, " in third
    assert "already complete" in third and "[train dpo] step" not in third  # no optimizer step taken again
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 2 and report["evaluate"]["num_prompts"] == 2
    assert (out / "evaluate" / "dpo" / "index.html").is_file()
