"""The command line: one command per job, bad input refused before Ray starts, and `status` of a run on storage."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import commit_checkpoint
from typer.testing import CliRunner

from videodpo_ray.cli import app
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.synthetic import write_synthetic_pairs

REPO = Path(__file__).resolve().parents[1]

COMMANDS = ("generate", "pair", "train", "evaluate", "run", "score", "sample", "status", "export", "import-videodpo",
            "convert", "runs", "demo")


def invoke(*arguments: str):
    return CliRunner().invoke(app, list(arguments))


def test_there_is_one_command_per_job():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in result.output, command


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if a job connects to Ray: bad input must be refused before any cluster work."""
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError("a job connected to Ray before refusing bad input")

    # import every job first: a module imported while jobs.common is patched would keep the patched function
    modules = [importlib.import_module(f"jobs.{name}") for name in ("common", "generate", "pair", "train", "sample",
                                                                     "score", "evaluate", "pipeline")]
    for module in modules:
        if hasattr(module, "connect_ray"):
            monkeypatch.setattr(module, "connect_ray", refuse)


def test_bad_input_exits_2_before_ray_starts(tmp_path: Path, no_ray):
    bad_prompts = tmp_path / "generate.yaml"
    bad_prompts.write_text(f"prompts: {tmp_path}/missing.txt\nout: {tmp_path}/out\nscorer: {{tiny: true}}\n")
    no_scores = tmp_path / "pair.yaml"
    no_scores.write_text(f"data: {tmp_path}/nothing\n")
    unknown_key = tmp_path / "run.yaml"
    unknown_key.write_text("prompts: [a fox]\ngenerate: {scorer: {tiny: true}}\nunknown_section: 1\n")
    no_pairs = tmp_path / "train.yaml"
    no_pairs.write_text(f"data: {{pairs_url: {tmp_path}/none}}\nrun: {{name: r, storage_path: {tmp_path}/runs}}\n")
    (tmp_path / "long.txt").write_text("a fox\n" + "z" * 10_000_000 + "\n")  # a 10 MB prompt on row 1
    long_prompt = tmp_path / "long.yaml"
    long_prompt.write_text(f"prompts: {tmp_path}/long.txt\nout: {tmp_path}/out\nscorer: {{tiny: true}}\n")
    cases = [
        (("generate", str(bad_prompts)), "missing.txt: prompts file not found"),
        (("generate", str(long_prompt)), "prompt of 10000000 characters"),
        (("generate", str(long_prompt), "max_prompt_chars=100"), "over the limit of 100"),
        (("pair", str(no_scores)), "no committed scores shards to pair"),
        (("run", str(unknown_key)), "unknown_section"),
        (("train", str(no_pairs)), "no committed pair shards"),
        (("generate", str(tmp_path / "absent.yaml")), "cannot read config"),
    ]
    for arguments, message in cases:
        result = invoke(*arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.output, (arguments, result.output)


def test_bad_input_exits_2_within_5_seconds_from_a_fresh_process(tmp_path: Path):
    """What a user sees: the installed command, a fresh interpreter (imports included), no Ray started."""
    no_prompts = tmp_path / "generate.yaml"
    no_prompts.write_text(f"prompts: {tmp_path}/missing.txt\nout: {tmp_path}/out\nscorer: {{tiny: true}}\n")
    no_pairs = tmp_path / "train.yaml"
    no_pairs.write_text(f"data: {{pairs_url: {tmp_path}/none}}\nrun: {{name: r, storage_path: {tmp_path}/runs}}\n")
    command = str(Path(sys.executable).with_name("videodpo-ray"))
    bad_override = (str(REPO / "configs" / "pipeline_demo.yaml"), "train.optim.learning_rate=1")  # the toy world's
    for arguments in (
        ("run", str(tmp_path / "absent.yaml")),
        ("run", *bad_override),
        ("generate", str(no_prompts)),
        ("train", str(no_pairs)),
    ):
        started = time.monotonic()
        result = subprocess.run([command, *arguments], capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        assert result.returncode == 2, (arguments, result.stderr)
        assert elapsed < 5.0, (arguments, f"{elapsed:.1f} s")
        assert "Ray" not in result.stdout + result.stderr, (arguments, result.stderr)


def test_job_modules_import_neither_torch_nor_ray():
    """What keeps bad input under 5 s on any machine: a job parses and checks its config before the heavy imports
    (torch alone takes 2-4 s), which happen only once there is work to do."""
    jobs = ("generate", "score", "pair", "train", "evaluate", "sample", "pipeline", "import_videodpo")
    heavy = ("torch", "ray", "diffusers", "deepspeed", "av", "transformers", "peft")
    modules = ", ".join(f"jobs.{job}" for job in jobs)
    script = f"import sys; import {modules}; print(sorted(set({heavy!r}) & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_status_reports_what_a_run_committed(tmp_path: Path):
    root = tmp_path / "root"
    model = build_model(ModelConfig(family="vc2", variant="tiny"), seed=0)
    write_synthetic_pairs(model, str(root), num_pairs=3, pairs_per_shard=2, num_frames=4, height=16, width=16)
    run = root / "train" / "dpo"
    state = ckpt.TrainState(2, 0, 2, 4, 1, 2, 1, 1, 0, [])
    commit_checkpoint(run, state.to_json(), 2)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as writer:
        for step, loss in enumerate([0.69, 0.61]):
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/implicit_accuracy", 0.5 + step / 4, step)
            writer.add_scalar("train/peak_memory_gib", 1.5 + 0.75 * step, step)
    (root / "evaluate" / "dpo").mkdir(parents=True)
    (root / "evaluate" / "dpo" / "summary.json").write_text(
        json.dumps({"num_prompts": 64, "win_rate": 0.625, "omniscore_gain_mean": 0.0123})
    )
    result = invoke("status", str(root))
    assert result.exit_code == 0, result.output
    assert "pairs: 2 shard(s), 3 rows committed" in result.output
    last_step = "step 2: loss 0.61, implicit_accuracy 0.75, peak_memory_gib 2.25"
    assert f"run {run}: checkpoint at step 2/4; {last_step}" in result.output
    evaluated = f"evaluate {root / 'evaluate' / 'dpo'}: win rate 0.625 over 64 prompts, OmniScore gain +0.0123"
    assert evaluated in result.output
    assert "nothing committed" in invoke("status", str(tmp_path / "empty")).output
