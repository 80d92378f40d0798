"""Generate + pair under faults (slow): a SIGKILLed sampler actor and a SIGKILLed driver change no pair row.

Reference: an uninterrupted generate + pair run. Then (1) a run whose sampler actor kills its own process in the
middle (Ray Data restarts it and retries its rows): every committed file is byte-identical to the reference; (2) a
driver (`python -m jobs.generate`, its own local Ray cluster) SIGKILLed right after its first chunk commit, then
rerun: only the missing chunks are sampled, and the pair shards equal the reference's byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from videodpo_ray import shards, storage
from videodpo_ray.config import load_config
from videodpo_ray.stages.generate import GenerateConfig
from videodpo_ray.stages.pair import PairConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a corgi on the beach", "a red car at night", "a balloon over mountains", "a kite over the sea",
           "a fox in the snow", "a boat on a lake"]
SETTINGS = {
    "model": {"family": "vc2", "variant": "tiny"},
    "samples_per_prompt": 2,
    "prompts_per_chunk": 2,
    "sampling": {"num_frames": 4, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8},
    "scorer": {"tiny": True},
    "sampler_pool": {"batch_size": 2},
    "scorer_pool": {"batch_size": 4, "num_gpus": 0},
}


def write_config(root: Path) -> Path:
    """The generate job's YAML for an output under `root` (prompts file beside it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    path = root / "generate.yaml"
    path.write_text(yaml.safe_dump({**SETTINGS, "prompts": str(root / "prompts.txt"), "out": str(root / "out")}))
    return path


def committed_files(out: str, kinds: tuple[str, ...] = ("samples", "scores", "pairs")) -> dict[str, str]:
    """sha256 of every committed shard file (parquet + manifest) of `kinds` under `out`."""
    return {
        f"{kind}/{name}": hashlib.sha256(storage.read_bytes(storage.join(out, kind, name))).hexdigest()
        for kind in kinds
        for name in storage.list_files(storage.join(out, kind))
    }


def generate_and_pair(config_path: Path, sampler_class: type | None = None):
    from jobs.generate import generate
    from jobs.pair import make_pairs

    config = load_config(GenerateConfig, str(config_path))
    report = generate(config, sampler_class=sampler_class)
    make_pairs(PairConfig(data=config.out, model=config.model))
    return report


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reference")
    report = generate_and_pair(write_config(root))
    assert report.sampled == [0, 1, 2]
    files = committed_files(str(root / "out"))
    assert len([name for name in files if name.startswith("pairs/shard-")]) == 6  # 3 chunks: parquet + manifest
    return files


def test_a_sigkilled_sampler_actor_changes_no_byte(reference: dict[str, str], tmp_path: Path):
    from actors.sampler import SamplerActor

    marker = tmp_path / "killed"

    class SamplerKilledOnce(SamplerActor):  # defined here: pickled by value into the actors
        def __call__(self, batch):
            if 1 in batch.column("chunk").to_pylist() and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)  # the actor process dies mid-batch
            return super().__call__(batch)

    report = generate_and_pair(write_config(tmp_path), sampler_class=SamplerKilledOnce)
    assert marker.exists() and (report.sampled, report.incomplete, report.failures) == ([0, 1, 2], {}, [])
    assert committed_files(str(tmp_path / "out")) == reference


def test_a_sigkilled_driver_reruns_only_the_missing_chunks(reference: dict[str, str], tmp_path: Path):
    config_path = write_config(tmp_path)
    command = [sys.executable, "-m", "jobs.generate", str(config_path)]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if line.startswith("generate: chunk "):  # the first chunk is committed: kill the driver and its cluster
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=600)
    output = "".join(lines)
    assert "generate: chunk " in output, output
    out = str(tmp_path / "out")
    committed = [info.index for info in shards.list_shards(out, "scores")]
    assert 1 <= len(committed) < 3, output

    report = generate_and_pair(config_path)
    assert report.skipped == committed  # nothing committed is sampled or scored again, nothing is missing:
    assert sorted(report.sampled + report.rescored + report.skipped) == [0, 1, 2]
    assert committed_files(out) == reference
