"""A real Ray head: `ray start --head` on 127.0.0.1 with token auth, the README's submit lines run as written
(working-dir upload, runtime env) from a fresh shell with only the project's environment, a moto S3 bucket.

One tiny pipeline run (3 prompts x 2 samples, 2 DeepSpeed steps): a concurrent second submission is refused, the
run commits its pair shards and checkpoint, a resubmission of the finished run exits 0 at once without touching
them, the upload stayed under 5 MB, and the test credentials appear nowhere: not in the bucket, the job logs or
Ray's session directory.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_ADDRESS = "http://127.0.0.1:8265"
README_ENDPOINT = "https://s3.example.com"
README_CONFIG = "configs/pipeline_demo.yaml"
README_RUN = "RUN=vc2-round1"
RUN = "tiny-round1"
UPLOAD_LIMIT = 5 * 1024 * 1024

PIPELINE = """\
prompts: [a corgi running on the beach, a red car in the rain at night, a hot air balloon over snowy mountains]
model: {family: vc2, variant: tiny}
generate:
  samples_per_prompt: 2
  prompts_per_chunk: 3
  sampling: {num_frames: 4, height: 32, width: 32, num_inference_steps: 2, fps: 8}
  scorer: {tiny: true}
  sampler_pool: {max_actors: 1, batch_size: 6}
  scorer_pool: {max_actors: 1, batch_size: 6, num_gpus: 0}
pair:
  encoder_pool: {max_actors: 1, batch_size: 6}
train:
  config: train.yaml
"""
TRAIN = """\
model: {family: vc2, variant: tiny, finetune: full}
data: {pairs_url: unset, pairs_per_worker: 1, epochs: 2, max_steps: 2}
optim: {lr: 1.0e-4, schedule: constant, grad_accum: 1}
deepspeed: {zero_stage: 2}
scaling: {num_workers: 1, use_gpu: false}
run: {name: unset, storage_path: unset, checkpoint_every: 2, num_to_keep: 1}
"""

pytestmark = pytest.mark.slow  # a Ray head, two job submissions and a pipeline run: ~3-6 min on 2 cores


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def readme_submit_script(address: str, config: Path, out_bucket: str, endpoint: str) -> str:
    """The README's submit block ("Run on a cluster") with this test's address, config, bucket and endpoint."""
    section = (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "ray job submit" in b)
    for old, new in ((README_ADDRESS, address), (README_ENDPOINT, endpoint), (README_CONFIG, str(config)),
                     ("s3://bucket/", f"{out_bucket}/"), (README_RUN, f"RUN={RUN}")):
        assert old in block, f"README submit block no longer contains {old!r}"
        block = block.replace(old, new)
    return block



def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    """A new login shell with only the project's environment activated (`source .venv/bin/activate`)."""
    venv = Path(sys.executable).parent.parent
    return {"HOME": str(home), "PATH": f"{venv}/bin:/usr/bin:/bin", "VIRTUAL_ENV": str(venv), "LANG": "C.UTF-8",
            **extra}


class RayHead:
    """`ray start --head --block` in its own session and temp dir; stopped by signalling that session only."""

    def __init__(self, root: Path, env: dict[str, str], token: str) -> None:
        port, dashboard, client, agent = free_ports(4)
        self.address = f"http://127.0.0.1:{dashboard}"
        self.temp_dir = root / "ray"
        self.token = token
        self.log = (root / "ray-start.log").open("w")
        self.process = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--temp-dir", str(self.temp_dir), "--num-cpus", "4", "--disable-usage-stats"],
            env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"})
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"ray start exited: {self.process.returncode}"
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"the Ray head at {self.address} did not come up in {timeout_s} s")

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


@pytest.fixture(scope="module")
def cluster():
    """A moto S3 server, a bucket, a Ray head started with test-only credentials and a token."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    credentials = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
                   "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    bucket = f"submit-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=bucket)
    root = Path(tempfile.mkdtemp(prefix="vdr-", dir="/tmp"))  # short: Ray's socket paths live under its temp dir
    (root / "home").mkdir()
    token = secrets.token_hex(32)
    (root / "token").write_text(token)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "token")}
    # a loaded 2-core machine starts Ray Train's worker group slowly (default timeout 60 s)
    head = RayHead(root, fresh_env(root / "home", **auth, **credentials, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300"),
                   token)
    try:
        head.wait_ready()
        yield {"head": head, "root": root, "s3": s3, "bucket": bucket, "endpoint": endpoint,
               "credentials": credentials, "submit_env": fresh_env(root / "home", **auth)}
    finally:
        head.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def bucket_objects(s3, bucket: str) -> dict[str, str]:
    """key -> ETag of every object in the bucket."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}


def test_readme_submission_runs_resumes_and_leaks_nothing(cluster):
    head, root, s3, bucket = cluster["head"], cluster["root"], cluster["s3"], cluster["bucket"]
    (root / "pipeline.yaml").write_text(PIPELINE)
    (root / "train.yaml").write_text(TRAIN)
    script = readme_submit_script(head.address, root / "pipeline.yaml", f"s3://{bucket}", cluster["endpoint"])

    def submit() -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", script], cwd=REPO, env=cluster["submit_env"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def job_status() -> str:
        status = subprocess.run(["ray", "job", "status", "--address", head.address, f"videodpo-{RUN}"], cwd=root,
                                env=cluster["submit_env"], capture_output=True, text=True)
        return status.stdout + status.stderr

    started = time.monotonic()
    first = submit()
    while "RUNNING" not in job_status():  # a second submission while the first runs is refused
        assert first.poll() is None, first.communicate()[0]
        time.sleep(3)
    second = submit()
    refused = second.communicate(timeout=120)[0]
    assert second.returncode != 0 and f"Job with submission_id videodpo-{RUN} already exists" in refused, refused
    upload = package_dirs(head.temp_dir)  # the unpacked working dir, while the job holds it
    first_output = first.communicate(timeout=1200)[0]
    first_s = time.monotonic() - started
    assert first.returncode == 0 and f"Job 'videodpo-{RUN}' succeeded" in first_output, first_output

    size = sum(path.stat().st_size for directory in upload for path in directory.rglob("*") if path.is_file())
    assert upload and size < UPLOAD_LIMIT, f"working-dir upload of {size} bytes"
    for directory in upload:
        assert {p.name for p in directory.iterdir()} >= {"videodpo_ray", "jobs", "actors", "configs"}
        assert not {p.name for p in directory.iterdir()} & {".venv", ".git", "tests", "demo-output", "test-artifacts"}

    objects = bucket_objects(s3, bucket)
    pairs = [key for key in objects if re.fullmatch(rf"{RUN}/pairs/shard-\d{{5}}\.parquet", key)]
    assert pairs and all(key.replace(".parquet", ".json") in objects for key in pairs)
    run = f"{RUN}/train/dpo"
    assert any(key.startswith(f"{run}/checkpoint-00000002/") for key in objects)
    assert f"{run}/checkpoint-00000002/train_state.json" in objects and f"{run}/export/export.json" in objects
    assert "[train dpo] step 2/2" in first_output

    started = time.monotonic()
    again = submit()
    again_output = again.communicate(timeout=600)[0]
    again_s = time.monotonic() - started
    assert again.returncode == 0 and f"Job 'videodpo-{RUN}' succeeded" in again_output, again_output
    # the job log of a submission id continues the earlier attempt's: this attempt is after its last entrypoint line
    attempt = again_output.rsplit(f"Running entrypoint for job videodpo-{RUN}", 1)[1]
    assert "[train dpo] already complete" in attempt and "[train dpo] step" not in attempt, attempt
    unchanged = {key: tag for key, tag in bucket_objects(s3, bucket).items() if not key.endswith(("report.json",
                                                                                                    "report.md"))}
    assert unchanged == {key: tag for key, tag in objects.items() if not key.endswith(("report.json", "report.md"))}
    assert again_s < first_s / 2, f"resubmission took {again_s:.0f} s (first run {first_s:.0f} s)"

    leaks = leaked(cluster["credentials"], root, s3, bucket, [first_output, refused, again_output])
    assert not leaks, f"test credentials found in: {leaks}"


def package_dirs(temp_dir: Path) -> list[Path]:
    """The unpacked working-dir packages of the session (`runtime_resources/working_dir_files/_ray_pkg_*`)."""
    return sorted(p for p in temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir())


def leaked(credentials: dict[str, str], root: Path, s3, bucket: str, outputs: list[str]) -> list[str]:
    """Where the access key id or secret key occurs: bucket objects, Ray's session directory, the job outputs."""
    needles = [credentials["AWS_ACCESS_KEY_ID"].encode(), credentials["AWS_SECRET_ACCESS_KEY"].encode()]
    found = [f"s3://{bucket}/{key}" for key in bucket_objects(s3, bucket)
             if any(n in s3.get_object(Bucket=bucket, Key=key)["Body"].read() for n in needles)]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and any(n in path.read_bytes() for n in needles):
            found.append(str(path))
    found += [f"job output {i}" for i, text in enumerate(outputs) if any(n.decode() in text for n in needles)]
    return found
