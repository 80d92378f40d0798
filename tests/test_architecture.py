"""The package's structure: the layer contracts hold, a violating import breaks them, modules stay small, and the
helpers that must exist once do."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("videodpo_ray", "actors", "jobs")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Ports that keep an upstream module layout so original weights load strictly.
UPSTREAM_LAYOUT_PORTS = {"videodpo_ray/scoring/amt.py", "videodpo_ray/models/lvdm_layout.py"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `root` (PYTHONPATH first, so a copy shadows the installed package)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_layer_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "violation", "message"),
    [
        ("videodpo_ray/shards.py", "import jobs.common", "videodpo_ray.shards -> jobs.common"),
        (
            "videodpo_ray/models/base.py",
            "import videodpo_ray.scoring",
            "videodpo_ray.models.base -> videodpo_ray.scoring",
        ),
        ("jobs/pair.py", "import jobs.generate", "jobs.pair -> jobs.generate"),
        ("videodpo_ray/stages/pair.py", "import actors.scorer", "videodpo_ray.stages.pair -> actors.scorer"),
    ],
)
def test_a_violating_import_breaks_the_contract(tmp_path: Path, module: str, violation: str, message: str):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint_imports(tmp_path).returncode == 0
    with (tmp_path / module).open("a") as handle:
        handle.write(f"\n{violation}  # injected violation\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout


def test_stages_and_library_never_import_ray():
    """Below the runtime nothing imports Ray, DeepSpeed's runtime or an actor (lazily either)."""
    offenders = []
    for path in source_files():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(("actors/", "jobs/")) or relative == "videodpo_ray/cli.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.match(r"\s*(import|from)\s+(ray|deepspeed)\b", line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_no_module_over_400_lines_except_upstream_ports():
    too_long = {
        path.relative_to(ROOT).as_posix(): count
        for path in source_files()
        if (count := len(path.read_text().splitlines())) > 400
    }
    assert set(too_long) <= UPSTREAM_LAYOUT_PORTS, too_long


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("TensorBoard reading", r"EventAccumulator\("),
        ("absolute-path helper", r"os\.path\.abspath\(|\.resolve\(\)\)"),
        ("URL joining", r"def (_?join|_?url_join)\("),
        ("key-list formatting", r"def \w*(key_mismatch|describe_keys|format_keys)\w*\("),
        ("strict state-dict loading", r"def \w*(load_strict|load_state_dict_strict|strict_load)\w*\("),
        ("remote-directory cache", r"def local_directory\("),
    ],
)
def test_shared_helpers_exist_once(what: str, pattern: str):
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in source_files()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(pattern, line)
    ]
    assert len(hits) == 1, f"{what} must exist exactly once, found {hits}"


def test_library_logs_instead_of_printing():
    """`print` only for user-facing lines of command lines: jobs, the CLI and the synthetic-data command."""
    command_lines = {"videodpo_ray/cli.py", "videodpo_ray/training/synthetic.py"}
    offenders = [
        f"{relative}:{number}"
        for path in source_files()
        if (relative := path.relative_to(ROOT).as_posix()).startswith(("videodpo_ray/", "actors/"))
        and relative not in command_lines
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.match(r"\s*print\(", line)
    ]
    assert not offenders, offenders
