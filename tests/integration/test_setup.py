"""scripts/setup.sh, the set-up half of the README's two commands, on the cases that broke it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import REPO


def _fail_shims(directory: Path, names: list[str]) -> dict[str, str]:
    """An environment in which `names` fail if called: nothing may be fetched or installed."""
    directory.mkdir()
    for name in names:
        shim = directory / name
        shim.write_text(f"#!/bin/sh\necho 'offline: {name} called' >&2\nexit 97\n")
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{directory}:{os.environ['PATH']}"}
    # pip, if run, finds no index: an editable install needs one for its build backend.
    env.update({"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/"})
    return env


def test_a_second_run_needs_nothing_from_the_network(tmp_path: Path) -> None:
    first = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, timeout=600)
    assert first.returncode == 0, first.stderr.decode()
    env = _fail_shims(tmp_path / "bin", ["apt-get", "apt", "curl", "wget"])
    again = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, timeout=120
    )
    assert again.returncode == 0, again.stderr.decode()
    assert b"offline:" not in again.stderr


def test_a_half_made_venv_is_rebuilt(tmp_path: Path) -> None:
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "ossfs_resume", "scripts"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / name)
    broken = copy / ".venv" / "bin"
    broken.mkdir(parents=True)
    (broken / "python").symlink_to("/nonexistent/python3")  # an interrupted creation
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=copy, capture_output=True, timeout=900
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"incomplete; recreating it" in result.stderr
    check = subprocess.run(
        [str(copy / ".venv" / "bin" / "python"), "-c", "import ossfs_resume, mfusepy"],
        capture_output=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr.decode()
