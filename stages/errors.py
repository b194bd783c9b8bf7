"""One error type for bad input, and the CLI wrapper that turns it into a one-line message and exit code 2.

Stages raise `PipelineError` at the boundary where input enters (params, Parquet files, model paths)
with a message that names the field or file and says what to do. `run_cli` prints it as a single
`error: ...` line on stderr and exits with code 2, so a shell, DVC or Prefect sees a clean failure.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# Set by `python -m flows.train` for the ranks it launches (docs/design.md §8): a directory where each rank leaves its
# bad-input message or its Ctrl-C instead of printing it, so that the launcher prints one line for all of them.
RANK_REPORTS_ENV = "RLOO_RANK_REPORTS"
INTERRUPTED = ("interrupted: what was complete is kept (every artifact is written whole or not at all); run the "
               "command again (without --restart) to continue")


RESTART = "python -m flows.train --restart"  # how to start a run over (docs/design.md §6), with params.yaml
_PARAMS_FILE = contextvars.ContextVar("rloo_params_file", default="params.yaml")  # `params_file_named`


@contextlib.contextmanager
def params_file_named(path: str):
    """While a command (or a flow run) runs with `--params path`, the advice it gives names that file
    (`restart_command`, `params_file`): followed to the letter, a bare `--restart` would archive the run and start over
    with params.yaml's settings."""
    token = _PARAMS_FILE.set(str(path))
    try:
        yield
    finally:
        _PARAMS_FILE.reset(token)


def params_file() -> str:
    return _PARAMS_FILE.get()


def with_params(command: str, path: str | None = None) -> str:
    """`command` with `--params path` (default: this command's `params_file()`) where that is not params.yaml."""
    path = params_file() if path is None else path
    return command + (f" --params {shlex.quote(path)}" if path != "params.yaml" else "")


def restart_command() -> str:
    """How to start this run over: `RESTART`, with the command's `--params` where it is not params.yaml."""
    return with_params(RESTART)


class PipelineError(Exception):
    """Bad input: the message names the field/file and the fix, in one line."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's `main(argv)`; a `PipelineError` becomes `error: <message>` and exit code 2, Ctrl-C one line and
    exit code 130."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("stages", "flows", "__main__"):  # Prefect's logging setup leaves the root at WARNING: ours say INFO
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with bad_input_exits():
            main(argv)
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise  # a message to print: Python's own exit path
        exit_now(exc.code or 0)
    exit_now(0)


def exit_now(code: int) -> None:
    """End the process as Python would, without its teardown: wait for the non-daemon threads, run every exit handler
    (Prefect's last logs and events, MLflow's, the temporary Prefect server's stop, logging's flush), flush stdout
    and stderr, then `os._exit`. What is skipped, the interpreter's module-by-module garbage collection of every
    object vLLM, torch and Prefect made, took ~7 s of each heavy command on the 2-core AVX2 EPYC and frees nothing the
    OS does not (docs/design.md §7). A bug's traceback never comes here: it takes Python's own exit path."""
    import threading

    join_threads = getattr(threading, "_shutdown", None)  # private CPython APIs (3.4+): where a Python lacks them,
    run_handlers = getattr(atexit, "_run_exitfuncs", None)  # its own exit path, slower, is the one taken
    if join_threads is None or run_handlers is None:
        raise SystemExit(code)
    join_threads()  # what Py_FinalizeEx does first: join the non-daemon threads
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def bad_input_exits() -> Iterator[None]:
    """A `PipelineError` inside becomes `error: <message>` on stderr and exit code 2 (run_cli's handling, without
    its logging set-up: for what runs before a command imports its libraries)."""
    global _TELLS_BAD_INPUT
    outer, _TELLS_BAD_INPUT = _TELLS_BAD_INPUT, True
    try:
        yield
    except PipelineError as exc:
        if not _report_to_launcher("error", str(exc)):
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever the process happened to be
        if not _report_to_launcher("interrupted", ""):
            print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        timeout = dist_timeout(exc)  # first: every rank that waited says so, whichever reported first
        if timeout is not None and _report_to_launcher("timeout", str(timeout).strip()[:300]):
            sys.exit(1)  # the launcher's line names the ranks that waited (rank 0's traceback is above, from Prefect)
        if peer_reported():  # a rank whose collective broke because another rank stopped: that rank's line says why
            _report_to_launcher("peer", "")
            sys.exit(1)
        full = disk_full_message(exc) or not_writable_message(exc)
        if full is None:
            raise
        if not _report_to_launcher("error", full):  # a full disk is not a bug: one line, as for bad input
            print(f"error: {full}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        _TELLS_BAD_INPUT = outer


_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # strerror of ENOSPC, EDQUOT


def disk_full(exc: BaseException | None) -> BaseException | None:
    """The exception in `exc`'s chain that says the disk (or the user's quota) is full, else None: an OSError with
    ENOSPC or EDQUOT, or one whose text says so (polars' ComputeError "... underlying IO error: No space left on
    device (os error 28)", safetensors' SafetensorError "... I/O error: No space left on device")."""
    return _in_chain(exc, lambda e: (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
                     or any(t in str(e) for t in _FULL_TEXTS))


def _in_chain(exc: BaseException | None, says: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in `exc`'s chain (its cause, else its context, 16 deep at most) for which `says` holds."""
    seen = 0
    while exc is not None and seen < 16:
        if says(exc):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


FREE_SPACE = ("free some space (`du -sh data/archive/*` shows superseded runs, in train.archive_dir where you moved it; "
              "`dvc gc -w` old cache entries) and run the command again")  # what every full-disk error advises


def free_gib(path: str | Path) -> str:
    """The space left on the filesystem that `path` is (or would be) written to, in GiB with two decimals ("" where
    that cannot be read): the nearest existing directory above it counts."""
    d = Path(path).absolute().parent
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return f"{shutil.disk_usage(d).free / 2**30:.2f}"
    except OSError:
        return ""


def disk_full_message(exc: BaseException, path: str | Path | None = None) -> str | None:
    """One line for a full disk anywhere in `exc`'s chain (the file being written where known: `path`, or the
    OSError's own; the space left on its filesystem; what to do), else None. Every artifact is written to a temporary
    file and renamed (stages.io): the files of the completed rounds are whole, and the command continues from them
    once there is space."""
    cause = disk_full(exc)
    if cause is None:
        return None
    where = path or getattr(cause, "filename", None)
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    text = (text.splitlines() or [type(cause).__name__])[0][:200]
    free = free_gib(where) if where else ""
    free = f", {free} GiB free there" if free else ""
    return f"disk full{f' writing {where}' if where else ''}: {text}{free}; what was complete is kept: {FREE_SPACE}"


# what gloo raises (a RuntimeError) when a collective gives up waiting for a peer (train.dist_timeout_s):
# "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"; NCCL's
# watchdog aborts the process instead (torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING), which the launcher reports
# as a rank killed by SIGABRT
_DIST_TIMEOUT = re.compile(r"gloo.*Timed out waiting \d+ms for (send|recv) operation", re.S)
# ... and when the peer is gone: a retry of the step cannot mend a broken group
_DIST_BROKEN = re.compile(r"gloo.*Connection (closed|reset) by peer", re.S)


def _dist_on() -> bool:
    """This process is in a torch.distributed group (several ranks)."""
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist and dist.is_available() and dist.is_initialized())
    except Exception:
        return False


def dist_timeout(exc: BaseException | None) -> BaseException | None:
    """The exception in `exc`'s chain of a gloo collective that timed out waiting for another rank, else None (and
    None outside a process group: another library's "timed out waiting" is not one)."""
    return _in_chain(exc, lambda e: bool(_DIST_TIMEOUT.search(str(e)))) if _dist_on() else None


def dist_broken(exc: BaseException | None) -> BaseException | None:
    """The exception in `exc`'s chain of a gloo collective that timed out or whose peer is gone, else None."""
    if not _dist_on():
        return None
    return _in_chain(exc, lambda e: bool(_DIST_TIMEOUT.search(str(e)) or _DIST_BROKEN.search(str(e))))


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def not_writable(exc: BaseException | None) -> OSError | None:
    """The OSError in `exc`'s chain that a file or dir's permissions or a read-only mount raised (EACCES, EPERM,
    EROFS, with the path it names), else None: the machine's setup, not a bug."""
    return _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in _NOT_WRITABLE and e.filename is not None)


def not_writable_message(exc: BaseException) -> str | None:
    """One line for `not_writable`'s error (the path, the system's words, what to do), else None."""
    cause = not_writable(exc)
    if cause is None:
        return None
    where = f"{cause.filename} -> {cause.filename2}" if cause.filename2 else str(cause.filename)
    # a temporary name the pipeline was creating (`.x.tmp-abc`, `.state-x.pt.tmp`) is not there: its dir is what to fix
    staged = Path(str(cause.filename))
    if not cause.filename2 and staged.name.startswith(".") and "tmp" in staged.name and not staged.exists():
        where = f"{staged.parent} (writing {staged.name} in it)"
    return (f"{where}: {cause.strerror or type(cause).__name__}; what was complete is kept: give this user access to "
            "it (its permissions, or a read-only mount) or point the params that name it elsewhere, and run the command "
            "again")


def peer_reported() -> bool:
    """Under `python -m flows.train`'s launch: has another rank already left its bad input or Ctrl-C (so that what
    fails here now, a collective whose peer is gone, follows from it)?"""
    own = _own_report()
    return own is not None and any(name.endswith(".json") and name != os.path.basename(own)
                                   for name in os.listdir(os.path.dirname(own)))


def _own_report() -> str | None:
    """This rank's report file in the launcher's reports directory; None outside `python -m flows.train`'s launch."""
    where, rank = os.environ.get(RANK_REPORTS_ENV), os.environ.get("RANK")
    return os.path.join(where, f"rank-{rank}.json") if where and rank is not None and os.path.isdir(where) else None


def _report_to_launcher(kind: str, message: str) -> bool:
    """A rank of `python -m flows.train`'s launch leaves its outcome in the launcher's reports directory (written
    whole: temp file, then rename); False where there is no such launcher (then the process prints it itself)."""
    path = _own_report()
    if path is None:
        return False
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"kind": kind, "message": message}, f)
        os.replace(path + ".tmp", path)
    except OSError:
        return False
    return True


def read_rank_reports(where: str) -> dict[int, dict[str, str]]:
    """The outcomes the ranks left with `_report_to_launcher`, by rank (a rank killed before it wrote has none)."""
    reports = {}
    for name in sorted(os.listdir(where)):
        if name.startswith("rank-") and name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(where, name)) as f:
                    reports[int(name[5:-5])] = json.load(f)
    return reports


_TELLS_BAD_INPUT = False  # inside `bad_input_exits`: a PipelineError will be told in its one `error:` line
# in a failure record's message: told by that one line (a full disk, a path the command may not write)
_TOLD_TEXTS = ("PipelineError",) + _FULL_TEXTS + ("Permission denied", "Read-only file system", "Operation not permitted")


class _NoTracebackForBadInput(logging.Filter):
    """Keeps a log record but drops its traceback when the exception is a PipelineError (bad input, not a bug) or a
    full disk. Drops a failure record altogether where its outcome is told once elsewhere: for either inside
    `bad_input_exits` (a command's one `error:` line says it; Prefect's task and flow failure lines would repeat it
    four times: the flow run's Failed state still records it), and under `python -m flows.train`'s launch once
    another rank has reported bad input or a Ctrl-C (the failure here, a broken collective, follows from it, and the
    launcher tells that rank's line). A Prefect worker's flow run keeps its records: they are its report."""

    def filter(self, record: logging.LogRecord) -> bool:
        failed = record.levelno >= logging.ERROR or "in state Failed" in str(record.msg)
        if failed and peer_reported():
            return False
        bad_input = record.exc_info and (isinstance(record.exc_info[1], PipelineError)
                                         or disk_full(record.exc_info[1]) is not None
                                         or not_writable(record.exc_info[1]) is not None)
        if failed and _TELLS_BAD_INPUT and (bad_input or any(t in record.getMessage() for t in _TOLD_TEXTS)):
            return False  # Prefect's lines name the exception's type: "... exception PipelineError: <message>"
        if _TELLS_BAD_INPUT and _ctrl_c(record):
            return False  # the command's one `interrupted:` line says it; the Crashed state is still recorded
        if bad_input:
            record.exc_info, record.exc_text = None, None
        return True


def _ctrl_c(record: logging.LogRecord) -> bool:
    """Prefect's task and flow lines for a Ctrl-C ("Crash detected! Execution was aborted by an interrupt signal.",
    or naming KeyboardInterrupt; "Finished in state Crashed(...)")."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        return True
    msg = record.getMessage()
    return ("Crash detected" in msg or "Crashed" in msg) and ("interrupt signal" in msg or "KeyboardInterrupt" in msg)


def quiet_bad_input_tracebacks(*loggers: str) -> None:
    """Prefect logs a failed task or flow with its traceback; for a PipelineError the one-line message says it all."""
    for name in loggers or ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):  # engine: a worker's
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForBadInput) for f in logger.filters):
            logger.addFilter(_NoTracebackForBadInput())


def queued_checkout(cwd: Path | None = None) -> Path | None:
    """The checkout a queued DVC experiment (`dvc exp run --queue`, `--temp`) runs for, when this process runs in one:
    DVC runs it in a copy of the git-tracked files, `<checkout>/.dvc/tmp/exps/<dir>/`, and deletes the copy after."""
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return None


def checkout_fix(path: str | Path, what: str = "this round") -> str:
    """How to get one file, round dir or checkpoint back from DVC's cache without touching anything else: a granular
    `dvc checkout` of exactly that path (`--force` where a damaged or other copy is in the way: DVC will not replace
    what it has not cached otherwise). A checkout of the whole rounds dir would put back the rounds DVC last recorded
    and remove later ones it never cached. Whatever comes back is checked against its manifest at the next start.
    Where DVC's records show it has no copy (a round trained by `python -m flows.train` after the last `dvc repro` or
    `dvc commit`), that checkout would only delete the file: the advice says so instead, or names `dvc pull` where
    the copy is recorded but only a remote can have it (`dvc_copy`)."""
    path = Path(path)
    quoted = shlex.quote(str(path))
    config = _dvc_config()
    copy = dvc_copy(path, config)
    force = "--force " if path.exists() else ""  # the damaged copy in the way: DVC asks, or refuses, otherwise
    if copy == "recorded" and config.get("remote"):
        return f"restore it with `dvc pull {force}{quoted}` (DVC's copy on its remote, when it was pushed)"
    if copy in ("recorded", "absent"):
        return (f"DVC has no copy of {what} (dvc.lock does not record it, or its cache entry is gone), so `dvc "
                f"checkout` {'would delete it instead of restoring it' if path.exists() else 'cannot restore it'}: put "
                "it back from a copy of yours")
    return f"restore it with `dvc checkout {force}{quoted}` (DVC's copy, when DVC cached {what})"


def _dvc_config() -> dict[str, str]:
    """The DVC settings of this repo that `dvc_copy` needs, from its config files and the user's and system's (read as
    text: section and key, no code run): "cache" (a cache dir or a named cache set anywhere) and "remote" (a default
    remote). Unreadable files are skipped."""
    try:
        user = [Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dvc" / "config"]
    except (RuntimeError, KeyError):  # no home dir to be found
        user = []
    found: dict[str, str] = {}
    for cfg in (Path("/etc/xdg/dvc/config"), *user, Path(".dvc/config"), Path(".dvc/config.local")):
        try:
            lines = cfg.read_text().splitlines() if cfg.is_file() else []
        except (OSError, ValueError):
            continue
        section = ""
        for line in lines:
            line = line.strip()
            head = line.split("#", 1)[0].split(";", 1)[0].strip()  # `[cache]  # a comment` is a header too
            if head.startswith("[") and head.endswith("]"):
                section = (head.strip("[]'\" ").split() or [""])[0].lower()
            elif "=" in line and not line.startswith(("#", ";")):
                key = line.split("=", 1)[0].strip().lower()
                if section == "cache" and key in ("dir", "local"):
                    found["cache"] = line
                elif section == "core" and key == "remote":
                    found["remote"] = line
    return found


DVC_CACHE = Path(".dvc") / "cache" / "files" / "md5"  # DVC 3's default cache, from the repo root
MANIFEST = "manifest.json"  # a round is complete when it exists (stages.loop.resume, which reads and writes it)


def dvc_copy(path: str | Path, config: dict[str, str] | None = None) -> str | None:
    """What DVC holds of `path` (a file, or every file of a dir) for `dvc checkout` to put back, from this repo's
    records alone (read, never run): the output of dvc.lock that holds `path`, its cached dir listing and the cached
    files. "cached": all there; "recorded": dvc.lock records it, the cache lacks some of it; "absent": the output is
    DVC's, `path` is not in its record, or the record is of another version of the round (its manifest differs from
    the one on disk), or no output of dvc.lock holds `path` (or there is no dvc.lock) and no `.dvc` file of a `dvc add`
    tracks it or a dir above it. None where that cannot be told: not run from a DVC repo's root, a `dvc add`'s record,
    a cache set elsewhere, a record this does not know (DVC 2's), a dir output whose listing is not in the cache, anything
    unreadable. `config`: `_dvc_config()` where the caller has read it. Never raises: it only adds to an error."""
    try:
        return _dvc_copy(Path(path), _dvc_config() if config is None else config)
    except Exception:
        return None


def _dvc_copy(path: Path, config: dict[str, str]) -> str | None:
    import yaml

    rel = Path(os.path.relpath(path.absolute(), Path.cwd())).as_posix()
    if rel.startswith("../") or not Path(".dvc").is_dir() or "cache" in config:
        return None
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").is_file() else {"stages": {}}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            where, digest = str(out["path"]).rstrip("/"), str(out.get("md5", ""))
            if rel != where and not rel.startswith(where + "/"):
                continue
            if out.get("hash") != "md5" or not digest:  # DVC 2's record (another cache layout) or no hash
                return None
            if not digest.endswith(".dir"):
                return ("cached" if _cached(digest) else "recorded") if rel == where else None
            if not _cached(digest):
                return None  # no listing: whether the record holds `path` (and which run's round) cannot be told
            listing = {e["relpath"]: e["md5"] for e in json.loads(_cache_file(digest).read_text())}
            inner = "" if rel == where else rel[len(where) + 1:]
            files = [m for r, m in listing.items() if not inner or r == inner or r.startswith(inner + "/")]
            round_dir = inner.split("/")[0]
            if inner and round_dir.startswith("round=") and _other_round(Path(where) / round_dir, inner, listing):
                return "absent"  # DVC's copy of this round dir is another run's, or an older one
            if not files:
                return "absent"
            return "cached" if all(_cached(m) for m in files) else "recorded"
    # no stage's record here holds it (no dvc.lock at all: `python -m flows.train` alone); DVC has none unless a `dvc
    # add` of it or of a dir above it has its own .dvc file, or a dir above it has stages of its own (records this
    # does not read)
    parts = Path(rel).parts
    added = any(Path(*parts[:i]).with_name(parts[i - 1] + ".dvc").is_file() for i in range(1, len(parts) + 1))
    nested = any((Path(*parts[:i]) / name).is_file() for i in range(1, len(parts)) for name in ("dvc.yaml", "dvc.lock"))
    return None if added or nested else "absent"


def _other_round(d: Path, inner: str, listing: dict[str, str]) -> bool:
    """Is DVC's record of round dir `d` another round than the one on disk: its manifest (a whole, readable one; not
    the file asked about, which may be the damaged one) differs from the recorded one?"""
    manifest = d / MANIFEST
    if inner == f"{d.name}/{MANIFEST}" or not manifest.is_file():
        return False
    data = manifest.read_bytes()
    try:
        json.loads(data)
    except ValueError:
        return False  # damaged itself: no evidence either way
    return listing.get(f"{d.name}/{MANIFEST}") != hashlib.md5(data).hexdigest()


def _cache_file(digest: str) -> Path:
    return DVC_CACHE / digest[:2] / digest[2:]


def _cached(digest: str) -> bool:
    return _cache_file(digest).is_file()
