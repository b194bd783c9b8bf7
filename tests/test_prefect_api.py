"""flows.api: the temporary Prefect server yields the cores to the training once it answers: every thread of it at
nice 19 and, where the kernel groups by session (sched_autogroup), its session's group too (docs/design.md §3)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from flows import api

TWO_THREADS = "import threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); time.sleep(60)"


def test_yield_cores_lowers_every_thread_and_the_sessions_group():
    proc = subprocess.Popen([sys.executable, "-c", TWO_THREADS], start_new_session=True)  # as start_server does
    try:
        p = psutil.Process(proc.pid)
        deadline = time.time() + 30
        while p.num_threads() < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert p.num_threads() == 2
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in p.threads()} == {0}
        api.yield_cores(proc.pid)
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in p.threads()} == {api.SERVER_NICE} == {19}
        group = Path(f"/proc/{proc.pid}/autogroup")
        if group.exists():  # its own session: its own group, lowered too; this process's group is not touched
            assert group.read_text().split()[-1] == "19"
            # (empty where this process is in the kernel's default group, as under a container's init: left as is)
            own = Path("/proc/self/autogroup").read_text().split()
            assert not own or own[-1] != "19", own
    finally:
        proc.kill()
        proc.wait()


def test_yield_cores_retries_the_group_while_the_kernel_says_eagain(monkeypatch, caplog):
    """Without CAP_SYS_ADMIN the kernel takes one autogroup change per 100 ms system-wide and answers EAGAIN
    otherwise: the write is tried again, and only a lasting refusal is a warning (the run goes on)."""
    calls = []

    def busy_twice(self, data, *a, **k):
        calls.append((self.name, data))
        if len(calls) < 3:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return len(data)

    def always_busy(self, data, *a, **k):
        calls.append((self.name, data))
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # never this test's own process
    try:
        monkeypatch.setattr(api.time, "sleep", lambda s: None)
        monkeypatch.setattr(Path, "write_text", busy_twice)
        api.yield_cores(child.pid)
        assert calls == [("autogroup", "19")] * 3 and "could not lower" not in caplog.text

        calls.clear()
        monkeypatch.setattr(Path, "write_text", always_busy)
        api.yield_cores(child.pid)
        assert len(calls) == 20 and "could not lower the temporary Prefect server's scheduling group" in caplog.text
        assert "EAGAIN" in caplog.text

        def refused(self, data, *a, **k):  # any other error: said at once, with the kernel's reason
            calls.append((self.name, data))
            raise PermissionError(errno.EACCES, "Permission denied")

        calls.clear()
        caplog.clear()
        monkeypatch.setattr(Path, "write_text", refused)
        api.yield_cores(child.pid)
        assert len(calls) == 1 and "Permission denied" in caplog.text and "EAGAIN" not in caplog.text
    finally:
        child.kill()
        child.wait()


HEARTBEATS = """
import sys
from flows.api import prefect_api
from prefect.settings import get_current_settings
with prefect_api(home=sys.argv[1]) as url:
    settings = get_current_settings()
    print(url == settings.api.url, settings.flows.heartbeat_frequency)
"""


def test_flow_runs_send_no_heartbeats_to_the_temporary_server_only(tmp_path):
    """Against the temporary server (it ends with the process; nothing watches its runs' heartbeats) a flow run
    sends none, so its end does not wait up to a second for the heartbeat thread; against a configured server
    (a deployment's) Prefect's default stays."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    cmd = [sys.executable, "-c", HEARTBEATS, str(tmp_path / "home")]
    ours = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert ours.stdout.split() == ["True", "None"], ours.stderr[-2000:]
    configured = subprocess.run(cmd, env=env | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, capture_output=True,
                                text=True, timeout=120, cwd=Path(__file__).parents[1])
    same_url, frequency = configured.stdout.split()
    assert same_url == "True" and frequency.isdigit(), configured.stderr[-2000:]  # Prefect's default (180 s in 3.7)


CRASH = """
import sys
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running
from flows.api import prefect_api
from flows.pipeline import crash_stage_runs, stage_tag

@flow(name="rloo-train")
def stand_in():
    pass

with prefect_api(home=sys.argv[1]):
    with get_client(sync_client=True) as client:
        ours = client.create_flow_run(stand_in, tags=[stage_tag("abc")], state=Running())
        other = client.create_flow_run(stand_in, tags=[stage_tag("other")], state=Running())
        n = crash_stage_runs(stage_tag("abc"), "its pipeline run stopped: KeyboardInterrupt")
        mine, theirs = client.read_flow_run(ours.id).state, client.read_flow_run(other.id).state
        print(n, mine.type.value, theirs.type.value, repr(mine.message))
"""


def test_a_killed_stage_s_flow_run_is_marked_crashed_by_its_pipeline(tmp_path, monkeypatch):
    """A training stage killed outright (kill -9) leaves its `rloo-train` flow run Running for good (Prefect's server
    marks nothing crashed on its own): its pipeline run marks the runs tagged with its id Crashed, and no other.
    `python -m flows.train` carries the tag from the pipeline's environment onto its flow run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "home")], env=env, capture_output=True,
                         text=True, timeout=180, cwd=Path(__file__).parents[1])
    assert out.stdout.strip().split(maxsplit=3) == ["1", "CRASHED", "RUNNING", "'its pipeline run stopped: KeyboardInterrupt'"], \
        out.stderr[-2000:]
    from prefect.context import TagsContext

    from flows.pipeline import STAGE_TAG_ENV, stage_tag
    from flows.train import _pipeline_tag

    monkeypatch.setenv(STAGE_TAG_ENV, stage_tag("abc"))
    with _pipeline_tag():
        assert stage_tag("abc") in TagsContext.get().current_tags
    monkeypatch.delenv(STAGE_TAG_ENV)
    with _pipeline_tag():
        assert stage_tag("abc") not in TagsContext.get().current_tags
