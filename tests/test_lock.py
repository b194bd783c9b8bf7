"""The checkout's run lock (stages/loop/lock.py): a second run fails at once with one line naming the holder, and a
scheduled (deployment) run waits for the holder to end instead, up to RLOO_LOCK_WAIT_S."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.errors import PipelineError
from stages.loop.lock import deployment_wait_s, run_lock

REPO = Path(__file__).resolve().parents[1]


def hold(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock at `path` for `seconds`; returned once it holds it."""
    code = (f"import time, sys; from stages.loop.lock import run_lock\n"
            f"with run_lock('holder', {str(path)!r}):\n    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path):
    proc = hold(tmp_path / "run.lock", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(PipelineError, match=rf"another run holds this checkout's lock: pid {proc.pid} \(holder:"):
            with run_lock("second", tmp_path / "run.lock"):
                pass
        assert time.monotonic() - t0 < 5
        with pytest.raises(PipelineError, match=r"\(waited 1 s, RLOO_LOCK_WAIT_S\)"):
            with run_lock("second", tmp_path / "run.lock", wait_s=1):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_waiting_run_takes_the_lock_when_the_holder_ends(tmp_path, caplog):
    proc = hold(tmp_path / "run.lock", 2)
    t0 = time.monotonic()
    with run_lock("scheduled", tmp_path / "run.lock", wait_s=60) as info:
        waited = time.monotonic() - t0
        assert info["what"] == "scheduled"
    proc.wait()
    assert 0.5 < waited < 30 and f"waiting for this checkout's lock (up to 60 s): pid {proc.pid}" in caplog.text


def test_only_a_deployment_s_run_waits(monkeypatch):
    assert deployment_wait_s() == 0.0  # a command at a terminal (no flow run of a deployment)
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "3f2a6c1e-0000-4000-8000-000000000000")  # Prefect's override
    assert deployment_wait_s() == 12 * 3600
    monkeypatch.setenv("RLOO_LOCK_WAIT_S", "90")
    assert deployment_wait_s() == 90.0
    monkeypatch.setenv("RLOO_LOCK_WAIT_S", "1h")
    with pytest.raises(PipelineError, match=r"^RLOO_LOCK_WAIT_S: '1h' is not a number of seconds"):
        deployment_wait_s()


def test_checkout_id_is_made_once_and_a_process_key_names_a_live_process(tmp_path):
    import os
    from concurrent.futures import ThreadPoolExecutor

    from stages.loop.lock import checkout_id, process_alive, process_key

    path = tmp_path / ".rloo" / "checkout-id"
    with ThreadPoolExecutor(8) as pool:  # made once, by whichever call comes first; the others read it
        ids = set(pool.map(lambda _: checkout_id(path), range(16)))
    assert len(ids) == 1 and len(ids.pop()) == 32 and os.listdir(path.parent) == ["checkout-id"]
    (tmp_path / "file").write_text("")
    assert checkout_id(tmp_path / "file" / "id") is None  # cannot be written: None, not an error
    me = process_key()
    assert process_alive(me)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    boot, ns, pid, start = me.split(":")
    assert not process_alive(f"{boot}:{ns}:{int(done.stdout)}:{start}")  # gone
    assert not process_alive(f"another-boot:{ns}:{pid}:{start}") and not process_alive("")
    assert process_alive(f"{boot}:another-namespace:{pid}:{start}")  # another container's: cannot tell, so alive
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(1.0)  # it has exited and is not reaped yet
    assert not process_alive(process_key(zombie.pid))
    zombie.wait()
