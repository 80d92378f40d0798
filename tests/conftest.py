"""Shared test fixtures: the shared fixtures directory, one moto S3 server and one Ray cluster per session."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def commit_checkpoint(run_dir: Path, state_json: str, step: int) -> Path:
    """A checkpoint directory of `run_dir` at `step` holding the train state `state_json`, committed as Ray Train
    records it (its checkpoint manager's snapshot names the latest committed directory)."""
    from videodpo_ray.training import checkpoint as ckpt

    directory = run_dir / ckpt.checkpoint_dir_name(step)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ckpt.TRAIN_STATE).write_text(state_json)
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": directory.name, "metrics": {}}}
    (run_dir / ckpt.RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(snapshot))
    return directory
VC2_TINY = SHARED / "fixtures" / "vc2-tiny"


@pytest.fixture(autouse=True)
def weights_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh remote-weights cache per test (never ~/.cache): a URL rewritten by a test is never served stale."""
    directory = tmp_path_factory.mktemp("weights-cache")
    monkeypatch.setenv("VIDEODPO_RAY_CACHE", str(directory))
    return directory


@pytest.fixture(scope="session")
def vc2_tiny_dir() -> Path:
    """The read-only tiny VC2 / T2V-Turbo checkpoint fixture in ../shared (never copied into the repo)."""
    if not VC2_TINY.is_dir():
        pytest.fail(f"shared fixture missing: {VC2_TINY} (CI clones the project with ../shared beside it)")
    return VC2_TINY


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 HTTP endpoint (moto in server mode) on 127.0.0.1; env vars set so every client finds it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server; returns its `s3://name` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str):
    """One local Ray cluster per test session (num_cpus 4), started after the S3 env so workers inherit it."""
    import ray

    # Without a dashboard, Ray Train's PlacementGroupCleaner auto-detects "the" state API server and, on a machine
    # running other Ray clusters, may ask another cluster whether our controller lives, get "no", and remove our
    # placement group mid-run (workers killed). An unreachable API server makes it keep monitoring instead.
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    # Worker groups start slowly on a loaded 2-core machine (default timeout 60 s).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single_torch_thread():
    """torch on one intra-op thread for the module: tiny models run ~20x faster on the shared 2-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture()
def check_dpo_step():
    """A checker for one Diffusion-DPO step + AdamW update on a VideoDiffusionModel (used by several model tests).

    `check(model, win, lose, text_embeddings, ln2_atol)` asserts: loss == ln 2 at step 0 (within `ln2_atol`: two
    copies of equal weights may differ in the last float bit on CPU GEMMs, which beta_dpo=5000 magnifies), only
    trainable parameters change (and at least one does), trainable parameters still require grad afterwards, and the
    reference prediction is bit-identical before and after the step while the policy's moves. Returns the loss.
    """
    import torch

    from videodpo_ray.training.step import dpo_step

    def check(model, win, lose, text_embeddings, ln2_atol: float = 0.0) -> float:
        trainable = {id(p) for p in model.trainable_parameters()}
        trainable_names = {name for name, p in model.named_parameters() if id(p) in trainable}
        assert trainable_names, "no trainable parameters"
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        probe_t = torch.full((win.shape[0],), 500, dtype=torch.long)
        probe = model.add_noise(win, torch.randn(win.shape, generator=torch.Generator().manual_seed(1)), probe_t)
        ref_before = model.predict(probe, probe_t, text_embeddings, reference=True)

        out = dpo_step(
            model, win, lose, text_embeddings, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0)
        )
        ln2 = torch.log(torch.tensor(2.0)).item()  # float32 ln 2
        assert abs(out.loss.item() - ln2) <= ln2_atol, out.loss.item()
        out.loss.backward()
        torch.optim.AdamW(model.trainable_parameters(), lr=1e-3).step()

        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        assert changed, "the step changed nothing"
        assert changed <= trainable_names, sorted(changed - trainable_names)[:5]
        assert all(p.requires_grad for p in model.trainable_parameters())
        with torch.no_grad():
            assert torch.equal(model.predict(probe, probe_t, text_embeddings, reference=True), ref_before)
            assert not torch.equal(model.predict(probe, probe_t, text_embeddings), ref_before)
        return out.loss.item()

    return check
