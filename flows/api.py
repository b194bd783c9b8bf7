"""A Prefect API for a flow run from the command line (`python -m flows.train`, `python -m flows.pipeline`).

With `PREFECT_API_URL` set (a `prefect server start`, Prefect Cloud, or a worker running a deployment), that API is
used. Without it, Prefect would start a temporary server of its own that a killed flow leaves running (it is
stopped by an exit handler, which kill -9 skips). This module starts the same temporary server (Prefect's API app
under uvicorn, UI off, on a free loopback port, its database under `.prefect/`) as a child that the kernel stops
when the flow's process dies (Linux `PR_SET_PDEATHSIG`), points Prefect at it for the rest of the process, and
stops it at interpreter exit. Use it once, in a command-line entry point.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 180
SERVER_NICE = 19  # the server's work (recording task runs from events, storing logs) waits for idle cores
_KEEP: list = []  # a busy 2-core machine has taken > 20 s
log = logging.getLogger(__name__)


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before the prctl: no signal will come
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(home: str | Path | None = None) -> tuple[subprocess.Popen, str] | None:
    """Start the temporary server now, without waiting for it (None when an API is configured): a command starts it
    first and imports what its flow needs while it boots on the other core (`prefect_api(started=...)` waits)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    import prefect

    home = home or os.environ.get("PREFECT_HOME") or ".prefect"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(Path(home).resolve()), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    Path(home).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
           "--lifespan", "on"]
    # its own session: a Ctrl-C at the terminal (SIGINT to the foreground process group) stops the flow, which then
    # reports its crashed state to this server; a server stopped with it made that report retry for a minute and end
    # in a traceback
    proc = subprocess.Popen(cmd, env=env, preexec_fn=functools.partial(_die_with_parent, os.getpid()), stdin=subprocess.DEVNULL, start_new_session=True)
    # Stopped after Prefect's own exit hooks have sent their last logs and events (atexit runs after them); a
    # server stopped earlier makes those hooks retry for about a minute.
    atexit.register(_stop, proc)
    return proc, url


@contextlib.contextmanager
def prefect_api(home: str | Path | None = None, started: tuple[subprocess.Popen, str] | None = None
                ) -> Iterator[str | None]:
    """Yield the API URL in use; start a temporary local server when none is configured (its database in `home`:
    PREFECT_HOME, or .prefect in the working directory), or wait for the one `start_server` started."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    proc, url = started or start_server(home)
    t0 = time.time()
    while not _healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode}")
        if time.time() - t0 > STARTUP_TIMEOUT_S:
            _stop(proc)
            raise RuntimeError(f"the temporary Prefect server did not answer within {STARTUP_TIMEOUT_S} s")
        time.sleep(0.2)
    yield_cores(proc.pid)
    # For the rest of the process, not just the block: Prefect's exit hooks still talk to the API. (The context
    # manager is kept referenced: a collected one would restore the old settings.)
    # No heartbeats from flow runs in this process (`python -m flows.train`'s) to a server that ends with it:
    # nothing watches them, and a flow run's end waits up to a second for its heartbeat thread. (Prefect's default
    # sends one every 180 s, for a crash detection that a server of the user's keeps; the runs `flows.serve` spawns
    # get that default too: Prefect leaves an unset setting out of a spawned run's environment.)
    _KEEP.append(temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
    _KEEP[-1].__enter__()
    yield url


def yield_cores(pid: int) -> None:
    """Lower the running server `pid` to nice 19, every thread of it and its scheduling group: its CPU (0.3-0.4 s a
    round of the default task, on AMX) would otherwise stall a training thread on a 2-core machine, and the flow
    never waits on it within a round but for one artifact (docs/design.md §3). Done once it answers, so that it boots
    at full speed. It runs in its own session, and where the kernel groups by session (Linux's `sched_autogroup`) a
    thread's nice only ranks it within its group: the group's nice is set too (at most once per 100 ms system-wide
    without CAP_SYS_ADMIN: retried), else it shares the cores half and half with the training process whenever it
    has work. Where neither can be set, it says so and the run goes on."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, int(tid), SERVER_NICE)
    except OSError:  # no /proc (macOS): the process, as far as the OS goes
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, SERVER_NICE)
    group = Path(f"/proc/{pid}/autogroup")
    why = "the kernel kept refusing: EAGAIN"
    for _ in range(20):
        try:
            group.write_text(str(SERVER_NICE))
            return
        except FileNotFoundError:  # no autogroups here: the threads' nice is what counts
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                why = str(exc)
                break
            time.sleep(0.11)
    log.warning("could not lower the temporary Prefect server's scheduling group to nice %d (%s); it may take CPU "
                "from the training rounds", SERVER_NICE, why)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
