"""benchmarks/gpu.py runs where only the device machine's packages are: no Ray, DeepSpeed, PyAV or s3fs.

The subprocess gets a `sitecustomize` that marks those packages absent (`sys.modules[name] = None`: an import
raises ModuleNotFoundError and `importlib.util.find_spec` returns None, as if they were not installed). fsspec is
not hidden: huggingface_hub, which transformers, diffusers and peft import, depends on it, so the device machine
has it. Without CUDA the script runs its tiny presets on the CPU and must finish within its budget.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("ray", "deepspeed", "av", "s3fs")


def hiding_site(tmp_path: Path) -> Path:
    """A directory whose sitecustomize.py marks the HIDDEN packages absent (put it on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in HIDDEN))
    return site


def benchmark_cases() -> list[str]:
    """The case names of benchmarks/gpu.py's CASES list, in order."""
    source = (ROOT / "benchmarks" / "gpu.py").read_text()
    return re.findall(r'^    \("([a-z0-9.-]+)", \d+, ', source.split("\nCASES:", 1)[1], re.MULTILINE)


def test_tiny_gpu_benchmark_runs_without_the_cluster_packages(tmp_path: Path):
    """Every case but the compile children (minutes of tracing on the CPU: the slow test below runs them)."""
    site = hiding_site(tmp_path)
    results = tmp_path / "gpu.json"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "CUDA_VISIBLE_DEVICES": ""}
    cases = [case for case in benchmark_cases() if "compile" not in case]
    assert len(cases) >= 9 and "vc2-sampling" in cases
    completed = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--tiny", "--budget-s", "120", "--json", str(results),
         "--cases", ",".join(cases)],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=240, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["tiny"] is True and data["device"] == "CPU" and data["elapsed_s"] < 120
    assert not data.get("errors"), data["errors"]
    assert [item["reason"] for item in data.get("skipped", [])] == [
        "pairs_per_worker auto: needs the CUDA allocator's peak"]  # every case ran
    assert [line.split("]")[0][1:] for line in completed.stdout.splitlines() if " took " in line] == cases
    cases = {row["case"] for row in data["rows"]}
    assert {"bf16 matmul", "VC2 sampling", "VC2 full DPO"} <= cases
    sampling = [row for row in data["rows"] if row["case"] == "VC2 sampling" and "s_per_video" in row]
    assert sampling[0]["variant"].startswith("baseline") and sampling[1]["speedup"] > 0
    assert "| case | variant |" in completed.stdout  # the closing markdown table


@pytest.mark.slow  # 25-40 s each
@pytest.mark.parametrize("kind", ["sampling-vc2", "sampling-t2v_turbo", "training"])
def test_the_compile_children_run_on_the_tiny_presets(tmp_path: Path, kind: str):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hiding_site(tmp_path)), str(ROOT)]),
                   "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run([sys.executable, "benchmarks/gpu.py", "--compile-child", kind, "--tiny"], cwd=ROOT,
                               env=environment, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [json.loads(line.removeprefix("RESULT ")) for line in completed.stdout.splitlines()
             if line.startswith("RESULT ")]
    result = {key: value for line in lines for key, value in line.items()}
    assert result["eager_s"] > 0 and result["compiled_s"] > 0 and result["fell_back"] is False
    assert ("sample_s" in result) == (kind != "training")


def test_the_hidden_packages_are_really_absent(tmp_path: Path):
    site = hiding_site(tmp_path)
    probe = "import importlib.util as u; print([u.find_spec(n) for n in ('ray', 'deepspeed', 'av', 's3fs')])"
    output = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)},
                            capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[None, None, None, None]"
