"""The checkout's run lock (stages/loop/lock.py): a second run fails at once with one line naming the holder, and a
scheduled (deployment) run waits for the holder to end instead, up to RLOO_LOCK_WAIT_S."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.errors import PipelineError
from stages.loop.lock import deployment_wait_s, run_lock, still_held

REPO = Path(__file__).resolve().parents[1]


def hold(path: Path, seconds: float, outputs: tuple = ()) -> subprocess.Popen:
    """Another process holding the lock at `path` (and of `outputs`) for `seconds`; returned once it holds it."""
    code = (f"import time, sys; from stages.loop.lock import run_lock\n"
            f"with run_lock('holder', {str(path)!r}, outputs={tuple(map(str, outputs))!r}):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
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


def test_a_directory_where_the_lock_file_goes_is_one_line(tmp_path):
    (tmp_path / "run.lock").mkdir()
    with pytest.raises(PipelineError) as exc:
        with run_lock("run", tmp_path / "run.lock"):
            pass
    assert str(exc.value) == (f"{tmp_path / 'run.lock'}: is a directory, where this checkout's run lock is a file; "
                              f"move it away (mv {tmp_path / 'run.lock'} {tmp_path / 'run.lock'}.dir) and re-run")


def test_a_run_in_another_checkout_with_the_same_output_dirs_is_refused(tmp_path):
    """Two checkouts whose params name the same (absolute) output dirs: each holds its own checkout's lock, and the
    output dirs' locks make the second run fail as a second run in one checkout does (before, both trained into the
    same rounds and the run was lost). Other output dirs, or the same ones once the first run ended, go on."""
    shared = tmp_path / "shared" / "rounds"
    proc = hold(tmp_path / "a" / "run.lock", 30, outputs=(shared, tmp_path / "a" / "policy"))
    try:
        with pytest.raises(PipelineError) as exc:
            with run_lock("second", tmp_path / "b" / "run.lock", outputs=(tmp_path / "b" / "policy", shared)):
                pass
        msg = str(exc.value)
        assert msg.startswith(f"{shared.resolve()}: another run writes into this output dir: pid {proc.pid} (holder: ")
        assert msg.endswith(f" in {REPO}; two checkouts whose params name the same output dirs take turns: wait for it "
                            "to end or stop it, then re-run")
        with run_lock("third", tmp_path / "c" / "run.lock", outputs=(tmp_path / "c" / "rounds",)) as info:
            assert info["what"] == "third"
    finally:
        proc.kill()
        proc.wait()
    with run_lock("second", tmp_path / "b" / "run.lock", outputs=(tmp_path / "b" / "policy", shared)) as info:
        assert info["what"] == "second"  # the first run's end (even a kill) let its locks go


def test_the_output_locks_are_where_rloo_lock_dir_says(tmp_path, monkeypatch):
    """RLOO_LOCK_DIR (the test suite sets its own, tests/conftest.py) moves the output dirs' lock files; without it
    they are in /tmp/rloo-locks, one per dir, named by a hash of its resolved path."""
    from stages.loop.lock import output_lock_path

    (tmp_path / "locks").mkdir(mode=0o700)
    monkeypatch.setenv("RLOO_LOCK_DIR", "locks")  # relative: two processes in other working dirs would not meet
    with pytest.raises(PipelineError, match=r"^RLOO_LOCK_DIR: must be an absolute path \(got locks\)"):
        output_lock_path(tmp_path / "rounds")
    monkeypatch.setenv("RLOO_LOCK_DIR", str(tmp_path / "locks"))
    with run_lock("run", tmp_path / "run.lock", outputs=(tmp_path / "rounds",)):
        pass
    assert [p.name for p in (tmp_path / "locks").iterdir()] == [output_lock_path(tmp_path / "rounds").name]
    assert (tmp_path / "locks").stat().st_mode & 0o7777 == 0o700  # a dir of the user's is not made world-writable
    assert output_lock_path(tmp_path / "x" / ".." / "rounds") == output_lock_path(tmp_path / "rounds")
    monkeypatch.delenv("RLOO_LOCK_DIR")
    assert output_lock_path(tmp_path / "rounds").parent == Path("/tmp/rloo-locks")


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


_HOLDER = """
import subprocess, sys, time
from stages.loop.lock import run_lock
with run_lock("scheduled pipeline", path=sys.argv[1]):
    subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1], sys.argv[3]])
    time.sleep(60)
"""
_STAGE = """
import sys, time
from stages.loop.lock import still_held
out = open(sys.argv[2], "a")
for _ in range(200):
    out.write(f"{still_held(sys.argv[1])}\\n")
    out.flush()
    time.sleep(0.05)
"""


def test_a_stage_notices_when_the_process_that_passed_it_the_lock_is_killed(tmp_path):
    """A pipeline passes its run lock down to the stage it starts (dvc repro -> python -m flows.train). Killed with
    kill -9, it lets the lock go while the stage goes on: `still_held` turns False for the stage, which stops at its
    next round instead of writing beside the next run. A real holder, a real SIGKILL."""
    import os
    import signal

    lock, seen = tmp_path / "run.lock", tmp_path / "seen.txt"
    repo = str(Path(__file__).parents[1])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock), _STAGE, str(seen)], cwd=repo,
                              env={**os.environ, "PYTHONPATH": repo})
    try:
        for _ in range(200):
            if seen.exists() and seen.read_text().count("True") >= 3:
                break
            time.sleep(0.05)
        assert seen.read_text().split() and set(seen.read_text().split()) == {"True"}
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        time.sleep(1.0)
        after = seen.read_text().split()
        assert after[-1] == "False" and "False" in after
    finally:
        holder.kill()
    assert still_held(lock)  # no lock passed down to this process: nothing to check
