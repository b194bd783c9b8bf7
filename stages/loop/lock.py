"""One run at a time per checkout: an exclusive lock on `.rloo/run.lock` (docs/design.md §6).

`python -m flows.train`, the Prefect flows (a scheduled deployment run, `flow.serve`) and `dvc repro` (which runs
the former) all take it before they touch the run's files. It is an `fcntl.flock` lock, so the kernel releases it
when its holder dies (even by kill -9): a dead run never leaves a stale lock. A second run fails at once with one
line naming the holder's PID, command and start time.

A process that holds the lock may start children that need it too (the scheduled pipeline runs `dvc repro`, which
runs `python -m flows.train`): the holder puts a token in the environment, and a child whose token matches the
lock file's and whose ancestor holds the lock goes on without locking again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from stages.errors import PipelineError

LOCK_PATH = Path(".rloo/run.lock")
ENV = "RLOO_RUN_LOCK"
LOCK_DIR_ENV = "RLOO_LOCK_DIR"  # where the output dirs' locks are, when not /tmp/rloo-locks (`output_lock_path`)
_held: list[str] = []  # tokens this process holds (re-entrant within a process)


def proc_stat(pid: int | str) -> list[str]:
    """The fields of Linux's `/proc/<pid>/stat` after the command name: [0] the state, [1] the parent pid, [19] the
    start time in clock ticks. OSError where there is no such process (or no /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _ancestors() -> set[int]:
    """PIDs of this process's ancestors (Linux /proc; empty elsewhere)."""
    pids, pid = set(), os.getpid()
    for _ in range(64):
        try:
            ppid = int(proc_stat(pid)[1])
        except (OSError, IndexError, ValueError):
            break
        if ppid <= 1:
            break
        pids.add(ppid)
        pid = ppid
    return pids


def _command() -> str:
    """How this process was started, as a user would type it (`python -m flows.train --rounds 3`)."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        argv = [sys.executable, *sys.argv]
    return " ".join([Path(argv[0]).name, *argv[1:]]) if argv else "?"


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _inherited(path: Path) -> bool:
    """True when an ancestor of this process holds the lock and passed its token down."""
    token = os.environ.get(ENV)
    if not token:
        return False
    info = _holder(path)
    return info.get("token") == token and info.get("pid") in _ancestors()


def still_held(path: str | Path = LOCK_PATH) -> bool:
    """Whether this process may go on with the run's files: it holds the lock, or the ancestor that passed it down is
    still its ancestor and still names it in the lock file. A pipeline killed with kill -9 lets the lock go while the
    training stage it started goes on (nothing is left to stop it): a round boundary is where such a stage notices
    and stops, before a next run could start beside it (docs/design.md §9). True where no lock was passed down (a
    flow called as a function, without the lock)."""
    return bool(_held) or not os.environ.get(ENV) or _inherited(Path(path))


def checkout_id(path: str | Path = LOCK_PATH.parent / "checkout-id") -> str | None:
    """This checkout's own id: a random hex made once beside the run lock (`.rloo/checkout-id`, git-ignored), so two
    checkouts that share a path and a host name (containers) are told apart; None where it cannot be read or written.
    A copy of a checkout made with its `.rloo/` (an image built from a used checkout, a cloned VM) shares the id:
    delete `.rloo/checkout-id` in the copy (docs/design.md §6)."""
    path = Path(path)
    for _ in range(50):
        try:
            found = path.read_text().strip()
        except FileNotFoundError:
            found = None
        except OSError:
            return None
        if found:
            return found
        if found is None and (made := _make_id(path)) is not None:
            return made
        time.sleep(0.02)  # another process created it and is writing its id
    return None


def _make_id(path: Path) -> str | None:
    """Create `path` with a new id, unless it exists (None then, as on an error)."""
    new = uuid.uuid4().hex
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:  # FileExistsError: another process's (read it), or not writable
        return None
    try:
        os.write(fd, new.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return new


def process_key(pid: int | None = None) -> str:
    """`boot:pidns:pid:start` naming a process uniquely on this machine (Linux: the boot id, the pid namespace, and
    the process's start time in clock ticks; elsewhere `?:?:pid:?`), for `process_alive`."""
    pid = os.getpid() if pid is None else pid
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
        start = proc_stat(pid)[19]
    except (OSError, IndexError):
        return f"?:?:{pid}:?"
    return f"{boot}:{ns}:{pid}:{start}"


def process_alive(key: str) -> bool:
    """Whether the process `process_key` named may still be running: False only where this machine can tell it is
    gone (another boot; the same pid namespace and no such process, or a zombie); a key from another pid namespace
    (another container on this kernel) cannot be checked, so True."""
    parts = key.split(":")
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    boot, ns, pid, start = parts
    if "?" in (boot, ns, start):  # no /proc: the pid alone
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    here_boot, here_ns, *_ = process_key().split(":")
    if boot != here_boot:
        return False  # the machine rebooted since
    if ns != here_ns:
        return True
    try:
        state = proc_stat(pid)[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and process_key(int(pid)) == key


WAIT_ENV = "RLOO_LOCK_WAIT_S"  # how long a scheduled (deployment) run waits for the lock; default 12 h


def in_deployment() -> bool:
    """Is this a deployment's flow run (a schedule, `prefect deployment run`, a served flow's run)?"""
    try:
        from prefect.runtime import deployment

        return deployment.id is not None
    except Exception:  # no Prefect context
        return False


def deployment_wait_s() -> float:
    """Seconds a flow run waits for the lock: a deployment's run (a schedule, `prefect deployment run`) queues behind
    whatever holds the checkout (another deployment's run, a shell `dvc repro`), as one deployment's own runs queue
    behind each other; a command typed at a terminal fails at once, naming the holder."""
    if not in_deployment():
        return 0.0
    value = os.environ.get(WAIT_ENV, str(12 * 3600))
    try:
        return max(0.0, float(value))
    except ValueError:
        raise PipelineError(f"{WAIT_ENV}: {value!r} is not a number of seconds; set it to e.g. 3600, or unset it "
                            "(12 h)") from None


def _who(info: dict) -> str:
    return (f"pid {info.get('pid')} ({info.get('what', 'a run')}: {info.get('cmd', '?')}) since {info.get('started', '?')}"
            if info else "another process")


def locked_outputs(params) -> tuple[str, str, str]:
    """The output dirs a run's lock covers beside the checkout's (`run_lock`'s `outputs`): its rounds, checkpoint and
    optimizer state (a start cleans the state dir's strays and a new configuration moves it to the archive)."""
    return params.train.rounds_dir, params.train.checkpoint_dir, params.train.state_dir


def output_lock_path(d: str | Path) -> Path:
    """Where the lock of an output dir is: a file named by a hash of the dir's resolved path in this machine's temp
    dir, so two checkouts whose params name the same dir (an absolute path) meet at one lock, and no file is added
    beside the user's dirs. The same machine only: a dir shared over a network filesystem is not covered.
    `RLOO_LOCK_DIR` names another dir for them (the test suite's own, so that its ~700 lock files go with it)."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(d).resolve()).encode()).hexdigest()[:16]
    if os.environ.get(LOCK_DIR_ENV):  # every process that should meet another's lock must see the same value
        where = Path(os.environ[LOCK_DIR_ENV])
        if not where.is_absolute():  # relative, two processes in other working dirs would not meet
            raise PipelineError(f"{LOCK_DIR_ENV}: must be an absolute path (got {where}); set it to one, or unset it "
                                "for /tmp/rloo-locks")
        return where / f"{key}.lock"
    # /tmp itself, not $TMPDIR: a shell's and a worker's TMPDIR differ (macOS per-user dirs, SLURM jobs), and the
    # locks would not meet
    return (Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())) / "rloo-locks" / f"{key}.lock"


def _lock_outputs(outputs, deadline: float, info: dict) -> list[int]:
    """flock each output dir's lock (`output_lock_path`) beside the checkout's, waiting until `deadline`; their fds.
    PipelineError naming the dir and the other run when one is held."""
    fds: list[int] = []
    try:
        for d in dict.fromkeys(str(Path(o).resolve()) for o in outputs):
            lp = output_lock_path(d)
            lp.parent.mkdir(mode=0o777, parents=True, exist_ok=True)
            if not os.environ.get(LOCK_DIR_ENV):  # a dir the user named keeps the mode they gave it
                with contextlib.suppress(OSError):
                    lp.parent.chmod(0o1777)  # every user's runs meet here (sticky, as /tmp)
            try:
                fd, writable = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666), True
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o666)  # every user's run may take it (the umask cut the mode)
            except PermissionError:  # another user's file (sticky dir, fs.protected_regular): flock needs no write
                fd, writable = os.open(lp, os.O_RDONLY), False
            fds.append(fd)
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    other = _holder(lp)
                    if time.monotonic() >= deadline:
                        raise PipelineError(
                            f"{d}: another run writes into this output dir: {_who(other)} in {other.get('cwd', '?')}; "
                            "two checkouts whose params name the same output dirs take turns: wait for it to end or "
                            "stop it, then re-run") from None
                    if not told:
                        import logging

                        logging.getLogger(__name__).warning("waiting for the output dir %s: %s in %s", d, _who(other),
                                                            other.get("cwd", "?"))
                        told = True
                    time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            if writable:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**info, "cwd": os.getcwd(), "dir": d}).encode(), 0)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


@contextlib.contextmanager
def run_lock(what: str = "training run", path: str | Path = LOCK_PATH, wait_s: float = 0.0,
             outputs=()) -> Iterator[dict]:
    """Hold the checkout's run lock for the duration; PipelineError (one line) when another process holds it (after
    waiting up to `wait_s` seconds for it to end). `outputs`: the run's output dirs (train.rounds_dir,
    train.checkpoint_dir), locked too (`output_lock_path`): a run in another checkout whose params name the same dirs
    is refused as a second run here is (both would write the same rounds). A process that inherits the lock (a
    stage under the scheduled pipeline, a rank under torchrun's launcher) inherits those as well."""
    path = Path(path)
    if _held or _inherited(path):
        yield _holder(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a directory, where this checkout's run lock is a file; move it away (mv {path} "
                            f"{path}.dir) and re-run") from None
    out_fds: list[int] = []
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    info = _holder(path)
                    waited = f" (waited {wait_s:.0f} s, {WAIT_ENV})" if wait_s else ""
                    raise PipelineError(f"{path}: another run holds this checkout's lock: {_who(info)}{waited}; wait "
                                        f"for it to end or stop it (kill {info.get('pid', '<pid>')}), then re-run") from None
                if not told:
                    import logging

                    logging.getLogger(__name__).warning("waiting for this checkout's lock (up to %.0f s): %s",
                                                        wait_s, _who(_holder(path)))
                    told = True
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "what": what, "cmd": _command()[:200], "token": token,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)  # first: a run refused meanwhile names this holder
        out_fds = _lock_outputs(outputs, deadline, {k: v for k, v in info.items() if k != "token"})
        old_env = os.environ.get(ENV)
        os.environ[ENV] = token
        _held.append(token)
        try:
            yield info
        finally:
            _held.remove(token)
            if old_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = old_env
            os.ftruncate(fd, 0)
    finally:
        for out_fd in out_fds:
            os.close(out_fd)
        os.close(fd)  # closing the descriptor releases the flock
