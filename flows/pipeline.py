"""The whole pipeline as one Prefect flow: the unit a schedule runs (docs/design.md §9).

    prefect deployment run rloo-pipeline/nightly                  # the scheduled deployment in prefect.yaml
    python -m flows.pipeline [--more-rounds N]                    # the same from a shell

A run takes the checkout's run lock, asks DVC what changed (`dvc status`), and runs the DVC stages that need it,
one Prefect task each, with DVC's own change detection: `dvc repro --single-item prepare`, then `train`, `evaluate`,
`report`. So `dvc.lock` always agrees with what the run wrote (`dvc status` is clean after it), and a user's
`dvc repro` and a scheduled run do the same thing. What a run does:

- nothing changed (no stage out of date, no new prompts, `more_rounds` 0): a reported no-op, in seconds;
- prompts were added to the prompts file: prepare picks them up (no trained prompt becomes a held-out one; a new
  prompt may take a held-out prompt's place, which then moves to training) and, when the run's rounds are all done,
  `train.rounds` is raised by
  enough rounds to train on each new prompt once (`rounds_per_new_prompt`, they come first in the schedule);
  training continues from the last checkpoint;
- params changed: training continues (more rounds) or starts clean (another run identity; the old run is moved to
  `train.archive_dir`), as `dvc repro` would;
- `more_rounds=N`: `train.rounds` is raised by N, and training continues for N more rounds.

`train.rounds` is raised in params.yaml itself (one line rewritten in place, the file's comments kept), so the
checkout says how far it has trained and DVC's lock file agrees; if the run fails, params.yaml is put back (but
for the rounds that completed and those added for new prompts, `_put_back`) and the last good model, metrics and
report stay where they were. A cancel or Ctrl-C stops the running stage's process group before the run lock is let go
(`_run_stopping_with_us`). The held-out metrics, what the run did, and the report's
tables become Prefect artifacts of the flow run. A deployment's `concurrency_limit: 1` and the run lock keep two runs
from overlapping; the training stage's own flow run (`rloo-train`) shows the rounds as tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from stages.errors import PipelineError, run_cli

STAGES = ("prepare", "train", "evaluate", "report")
_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


# DVC's lock on a stage's files (`rwlock`), which another dvc command of this checkout holds. (Not its repo lock,
# "Unable to acquire lock": DVC gives that up while a stage's command runs and takes it back after, so that error can
# come after a stage ran, and running the command again would run the stage again: `--wait-for-lock` waits for it.)
_DVC_BUSY = re.compile(r"^ERROR: .*is busy, it is being blocked by")
DVC_RETRY_S = 5.0


DVC_LOCK = Path(".dvc/tmp/lock")  # DVC's repository lock (zc.lockfile: an flock, the holder's pid inside)


def dvc_lock_holder() -> str | None:
    """What holds DVC's repository lock now (`PID 123 (dvc repro)`), or None when it is free (or not DVC's default
    flock: `core.hardlink_lock`). Tried with a shared flock, let go at once: a dvc that asks for it meanwhile
    retries."""
    import fcntl

    try:
        with DVC_LOCK.open("rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = f.read(32).decode(errors="replace").strip()
            else:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                return None
    except OSError:
        return None
    with contextlib.suppress(OSError, ValueError):
        args = [a.decode(errors="replace") for a in Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0") if a]
        line = " ".join([Path(args[0]).name, *args[1:]])
        return f"PID {pid} ({line if len(line) <= 80 else line[:77] + '...'})"
    return f"PID {pid or '?'}"


def _flow_log() -> logging.Logger:
    """This flow run's logger; the module's outside a flow run (a direct call, a test)."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger(__name__)


def _dvc(*args: str) -> subprocess.CompletedProcess:
    """A dvc command. A deployment's run that finds a stage's files locked by DVC (a `dvc repro` typed in a shell, which
    takes the run lock only while its train stage runs) waits for them as it waits for the run lock, up to
    `deployment_wait_s`; DVC refuses such a command before it runs the stage, so trying again is safe. DVC's repository
    lock, which any dvc command holds for moments (and a `dvc repro` between its stages), is waited for
    (`--wait-for-lock`): refused after DVC's 3 s, a train stage's hours could end in a failure to save its outputs."""
    from stages.loop.lock import deployment_wait_s

    exe = Path(sys.executable).with_name("dvc")
    cmd = [str(exe) if exe.exists() else "dvc", "--wait-for-lock", *args]
    deadline, waiting = None, False
    while True:
        holder = dvc_lock_holder()
        if holder:  # DVC waits for it in silence (its progress line is off without a terminal)
            _flow_log().info("waiting for DVC's repository lock %s, held by %s", DVC_LOCK, holder)
        proc = _run_stopping_with_us(cmd, args[-1] if args[0] == "repro" else None)
        # refused before any stage ran (DVC takes a stage's rwlock before running it): safe to run again
        busy = proc.returncode and "Running stage" not in proc.stdout and _dvc_busy(proc.stderr or proc.stdout)
        if not busy:
            break
        if deadline is None:
            deadline = time.monotonic() + deployment_wait_s()
        if time.monotonic() + DVC_RETRY_S > deadline:
            break
        if not waiting:
            waiting = True
            get_run_logger().info("waiting for DVC's lock: %s", busy)
        time.sleep(DVC_RETRY_S)
    if proc.returncode:
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {_why(proc.stderr or proc.stdout)}")
    return proc


STOP_GRACE_S = 15.0  # after a Ctrl-C or a cancel: how long a stage gets to end on its own (all of a stop stays
# below Prefect's 30 s before it kills the flow run's process)
# what the stages log: passed on to this flow run's log, with the stage's name. Two formats: stages.errors.run_cli's
# (`12:00:00 WARNING stages.x: ...`), and Prefect's console one (`12:00:00.123 | WARNING | stages.x - ...`), which a
# stage that imports Prefect before run_cli (`python -m flows.train`) logs in: Prefect's logging setup came first
_STAGE_LOG = re.compile(r"^\d\d:\d\d:\d\d(?:\.\d+ \|)? (INFO|WARNING|ERROR)(?: +\|)? ((?:stages|flows)[\w.]*)(?::| -) (.*)$")


STAGE_TAG_ENV = "RLOO_PIPELINE_TAG"  # the tag a stage's own flow run (rloo-train) carries: which pipeline run ran it


def stage_tag(pipeline_run_id) -> str:
    return f"rloo-pipeline:{pipeline_run_id}"


def crash_stage_runs(tag: str, reason: str) -> int:
    """Mark Crashed the flow runs tagged `tag` (a stage's `rloo-train` run, under this pipeline run) that are still
    Running or Pending: a stage killed outright (kill -9, or the SIGKILL after a stop's grace) cannot report its end,
    and Prefect's server marks nothing crashed on its own, so the run stayed Running in the UI for good (found
    2026-12-07). Called once the stage's processes are gone; returns how many were marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    live = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]), state=live))
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
    return len(runs)


def _stage_env() -> dict[str, str]:
    """The environment of a dvc command: dvc.yaml's `python -m ...` commands find this interpreter first on PATH (a
    worker started as `.venv/bin/prefect worker start`, without the venv activated, would otherwise run the stages
    with the system's python), and a training stage reports to this run's Prefect API (a temporary server of
    `python -m flows.pipeline`) instead of starting a second server on the same database."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        if flow_run.id:
            env[STAGE_TAG_ENV] = stage_tag(flow_run.id)  # `python -m flows.train` tags its flow run with it
    with contextlib.suppress(Exception):
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return env


def _run_stopping_with_us(cmd: list[str], stage: str | None) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own and collect its output; the stages' log lines go to this flow run's
    log as they come (`stage`: the name they get). When this process is stopped while it runs (a cancel, whose SIGTERM
    Prefect raises here; a Ctrl-C), the whole group is stopped too, and waited for, before the stop goes on and the run
    lock is released: DVC does not pass signals on to a stage, so a training stage would otherwise go on without the
    lock, beside the next run (docs/design.md §9). The group gets SIGINT (a Ctrl-C: a training stage writes its
    completed rounds and exits), then SIGKILL after `STOP_GRACE_S` (a kill never loses a completed round)."""
    import threading

    logger = None
    with contextlib.suppress(Exception):
        logger = get_run_logger()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True, env=_stage_env())
    out: list[str] = []
    err: list[str] = []

    def pump(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)
            m = _STAGE_LOG.match(line.rstrip("\n")) if logger is not None and stage else None
            if m:
                with contextlib.suppress(Exception):
                    logger.log(getattr(logging, m.group(1)), "%s: %s", stage, m.group(3))

    threads = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.wait()
    except BaseException:
        _stop_group(proc)
        raise
    finally:
        deadline = time.monotonic() + 3.0  # the pipes end with the processes (a stopped stage's orphan holds them)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))


def _descendants(*pids: int) -> dict[int, str]:
    """The processes below `pids` (their children, theirs, ...) by pid, each with its `process_key`: what a stop kills
    besides the process group, whatever session they put themselves in (torchrun starts each rank in its own)."""
    from stages.loop.lock import proc_stat, process_key

    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if d.name.isdigit():
            try:
                children.setdefault(int(proc_stat(d.name)[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = {}, list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = process_key(child)
            todo.append(child)
    return found


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop `proc` and what it started: SIGINT to its process group (as a Ctrl-C at a terminal: once to each, and a
    torchrun launcher passes it on to its ranks), then, after `STOP_GRACE_S`, SIGKILL to the group and to every
    process found below it at the start of the stop or at the kill (`_descendants`; ranks in sessions of their own
    would outlive a killed launcher), each only while it is still the process recorded. Back once `proc` has ended and
    the others are gone (up to 3 s more: they are not this process's children to wait for). Stop signals are held
    back meanwhile: a second Ctrl-C, a repeated cancel or a hangup's second SIGHUP must not cut the stop short (they
    are delivered when it is done)."""
    import signal

    from stages.loop.lock import process_alive, process_key

    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        known = _descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        known |= _descendants(*known, *([proc.pid] if proc.returncode is None else []))
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid, key in known.items():
            if process_key(pid) == key:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(process_alive(key) for key in known.values()):
            time.sleep(0.05)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _dvc_busy(output: str) -> str | None:
    """DVC's lock message with what holds it (`(PID 123): dvc repro`, on the line after DVC's `ERROR:`), or None."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if _DVC_BUSY.match(ln):
            holder = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("(PID") else ""
            return f"{ln.removeprefix('ERROR: ')} {holder}".strip()
    return None


def _why(output: str) -> str:
    """The reason in a failed `dvc repro`'s output: the stage's own `error: ...` line (a bad input), else the last
    line of its traceback (a bug), then DVC's summary line (`ERROR: failed to reproduce ...`) in brackets."""
    busy = _dvc_busy(output)
    if busy:  # DVC's own lock: say who holds it, and that its rwlock file is not to be removed while that runs
        return (f"{busy}: another dvc command of this checkout holds it; run again once it has finished (a scheduled "
                f"run waits for it up to RLOO_LOCK_WAIT_S)")
    # a stage killed mid-progress-bar leaves the bar's last frame without a newline: DVC's line follows on the same one
    lines = [part.strip() for ln in output.strip().splitlines() for part in re.split(r"(?=ERROR: )", ln)]
    lines = [ln for ln in lines if ln]
    dvc = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "?")
    ours = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
    bug = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", ln)
                and not ln.startswith("ERROR")), None)
    stage = ours.removeprefix("error:").strip() if ours else bug
    return f"{stage} ({dvc})" if stage else dvc


@task(name="dvc status", **_TASK)
def status_task() -> list[str]:
    """The stages DVC sees as changed (their deps, params or outs differ from dvc.lock)."""
    out = _dvc("status", "--json").stdout.strip() or "{}"
    return sorted({name.split(":")[-1].split("@")[0] for name in json.loads(out)})


@task(name="stage", **_TASK)
def stage_task(stage: str) -> dict:
    """`dvc repro --single-item <stage>`: runs it when DVC sees it changed, else nothing."""
    t0 = time.perf_counter()
    proc = _dvc("repro", "--single-item", stage)
    ran = f"Running stage '{stage}'" in proc.stdout
    get_run_logger().info("%s: %s in %.1f s", stage, "ran" if ran else "up to date", time.perf_counter() - t0)
    return {"stage": stage, "ran": ran, "seconds": time.perf_counter() - t0}


def _rounds_line(text: str) -> tuple[int, re.Match]:
    """The `rounds:` of params.yaml's `train:` section (the value and where it is): a `rounds: N` line of the block
    under `train:` (a comment after `train:` allowed), or in a one-line `train: {..., rounds: N, ...}`."""
    flow_map = re.compile(r"(?m)^train:[ \t]*\{(?:[^\n#{}]*?[,\s])?(rounds:[ \t]*)(\d+)[^\n#{}]*\}[ \t]*(?:#.*)?$")
    flow_map = flow_map.search(text)
    if flow_map:
        return int(flow_map.group(2)), flow_map
    section = re.search(r"(?m)^train:[ \t]*(?:#.*)?$", text)
    if section is None:
        raise PipelineError("params.yaml: no `train:` section to raise train.rounds in; add one with `rounds: N` "
                            "under it (see params.yaml's own)")
    child = re.compile(r"(?m)^([ \t]+)[^\s#]").search(text, section.end())  # the indent of the section's keys
    indent = re.escape(child.group(1)) if child else "[ \t]+"
    m = re.compile(rf"(?m)^({indent}rounds:[ \t]*)(\d+)[ \t]*(?:#.*)?$").search(text, section.end())
    nxt = re.compile(r"(?m)^[^\s#]").search(text, section.end())
    if m is None or (nxt and m.start() > nxt.start()):
        raise PipelineError("params.yaml: `train.rounds` is not set; set it so a scheduled run can raise it")
    return int(m.group(2)), m


def raise_rounds(path: Path, by: int) -> tuple[int, int]:
    """Raise train.rounds in params.yaml by `by`, rewriting only that number (comments and layout kept)."""
    from stages.io import write_text

    text = path.read_text()
    old, m = _rounds_line(text)
    write_text(text[: m.start(2)] + str(old + by) + text[m.end(2):], path)
    return old, old + by


def plan_rounds(params, more_rounds: int, rounds_per_new_prompt: float) -> tuple[int, list[str]]:
    """How many rounds to add to train.rounds: `more_rounds`, plus, when every round of this run is done and prompts
    were added since its last one, enough to train on each new prompt once. When more rounds of this run are complete
    than train.rounds says (a `python -m flows.train --rounds N` run), it first catches up with them: `more_rounds`
    means that many beyond what is trained, and a scheduled run does not fail on "N rounds asked, but more complete".
    Rounds of another configuration (moved aside when this one trains) count for nothing: this run starts at round 0
    with train.rounds as it is, over the whole split."""
    from stages.io import read_table
    from stages.loop.resume import new_prompts, scan_rounds, split_record
    from stages.loop.warm import PREPARED_TRAIN

    done = sorted((r, m) for r, (_, m) in scan_rounds(Path(params.train.rounds_dir)).items() if m is not None)
    mine = {params.identity(), *params.identity_aliases()}
    ours = [m for _, m in done if m.get("identity") in mine]  # another run's rounds will be archived
    added: list[str] = []
    if ours and Path(PREPARED_TRAIN).is_file():
        added = new_prompts(ours[-1], split_record(read_table(PREPARED_TRAIN)))
    extra = more_rounds + max(0, len(ours) - params.train.rounds)
    if added and len(ours) >= params.train.rounds:
        extra += math.ceil(len(added) * rounds_per_new_prompt / params.train.prompts_per_round)
    return extra, added


@contextlib.contextmanager
def _to_run_log(run_logger):
    """This process's own `stages.*` log records (a wait for the run lock, a run moved back from the archive) go to
    the flow run's log while the flow runs: Prefect sends only its own loggers' records to its API, and a worker's
    console is not where a user of the UI looks. Not propagated meanwhile: the run's logger prints them once."""
    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                run_logger.log(record.levelno, "%s", record.getMessage())

    target = logging.getLogger("stages")
    handler, level, propagate = Forward(logging.INFO), target.level, target.propagate
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.setLevel(level)
        target.propagate = propagate


def check_arguments(more_rounds: int, rounds_per_new_prompt: float) -> None:
    """The flow's own parameters (a deployment's, or `--more-rounds`): one-line PipelineError when out of range."""
    if more_rounds < 0:
        raise PipelineError(f"more_rounds: must be >= 0 (got {more_rounds})")
    if not (math.isfinite(rounds_per_new_prompt) and rounds_per_new_prompt >= 0):
        raise PipelineError(f"rounds_per_new_prompt: must be a number >= 0 (got {rounds_per_new_prompt}); 1 trains "
                            "once on each new prompt, 0 adds no rounds for them")


@flow(name="rloo-pipeline", log_prints=False)
def pipeline_flow(params_path: str = "params.yaml", more_rounds: int = 0, rounds_per_new_prompt: float = 1.0) -> dict:
    """prepare -> train -> evaluate -> report, as `dvc repro` runs them; see the module docstring for what a
    scheduled run does in each case."""
    from stages.errors import quiet_bad_input_tracebacks
    from stages.loop.lock import deployment_wait_s, locked_outputs, run_lock
    from stages.params import load_params

    quiet_bad_input_tracebacks()
    check_arguments(more_rounds, rounds_per_new_prompt)
    logger = get_run_logger()
    path = Path(params_path)
    if not path.is_file() or path.resolve() != Path("params.yaml").resolve():
        # dvc.yaml's stages read ./params.yaml: raising train.rounds in another file would train from this one
        raise PipelineError(f"params_path: {params_path} is not this project's params.yaml ({Path('params.yaml').resolve()}), "
                            "which `dvc repro` reads; run the pipeline from the project whose params.yaml you mean")
    from stages.loop.resume import restore_interrupted

    t0 = time.perf_counter()
    steps: list[dict] = []
    put_back = "as the run found it"
    during = None  # what the run was doing: what a cancel stopped (_failure_note)
    try:
        # a scheduled run queues behind the lock's holder
        during = "waiting for the run lock"
        with _to_run_log(logger), run_lock("scheduled pipeline", wait_s=deployment_wait_s(),
                                           outputs=locked_outputs(load_params(path))):
            during = "checking what changed"
            restore_interrupted(load_params(path))  # a run killed in round 1: put back before the rounds are counted
            changed = status_task()
            if not changed and more_rounds == 0:
                extra, added = plan_rounds(load_params(path), 0, rounds_per_new_prompt)
                if not extra:
                    summary = {"noop": True, "changed": [], "seconds": time.perf_counter() - t0}
                    _run_artifact("### Nothing to do\n\nDVC sees every stage up to date and no prompts were "
                                  "added: no stage ran.")
                    logger.info("nothing changed: no stage ran")
                    return summary
            original = path.read_text()
            rounds = None
            try:
                during = "the prepare stage"
                steps.append(_stage(path, "prepare"))
                params = load_params(path)
                extra, added = plan_rounds(params, more_rounds, rounds_per_new_prompt)
                if extra:
                    rounds = raise_rounds(path, extra)
                    logger.info("train.rounds %d -> %d (%d new prompt(s), more_rounds=%d)", *rounds, len(added),
                                more_rounds)
                for stage in STAGES[1:]:
                    during = f"the {stage} stage"
                    steps.append(_stage(path, stage))
            except BaseException:
                try:
                    owed = rounds[1] - rounds[0] - more_rounds if rounds else 0
                    put_back = _put_back(path, original, rounds, logger, owed)
                except Exception as exc:  # the run's own failure is the one to report
                    put_back = f"could not be put back ({exc})"
                    logger.warning("could not put params.yaml back: %s", exc)
                raise
            summary = {"noop": False, "changed": changed, "new_prompts": len(added), "rounds": rounds,
                       "stages": steps, "seconds": time.perf_counter() - t0}
            _artifacts(summary)
            return summary
    except BaseException as exc:  # a failed run leaves its artifact too (the lock's wait, DVC, a stage)
        with contextlib.suppress(Exception):
            _run_artifact(_failure_note(exc, [s["stage"] for s in steps if s["ran"]], put_back, during))
        with contextlib.suppress(Exception):
            from prefect.runtime import flow_run

            if flow_run.id and crash_stage_runs(stage_tag(flow_run.id), f"its pipeline run stopped: {type(exc).__name__}"):
                logger.warning("the training stage's own flow run, which it could not end itself, is marked Crashed")
        raise


def _failure_note(exc: BaseException, ran: list[str], put_back: str, during: str | None = None) -> str:
    """The `rloo-pipeline-run` artifact of a run that did not end well: "Stopped" for a cancel (Prefect raises its
    SIGTERM as TerminationSignal, whose text is empty) or a Ctrl-C, saying what it stopped (`during`: what the run
    was doing), "Failed" with the reason otherwise."""
    from prefect.exceptions import TerminationSignal

    heading, reason = "Failed", str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (KeyboardInterrupt, TerminationSignal)):
        if during is None:
            what = "the run was stopped"
        elif during.startswith("the "):  # a stage
            what = f"{during} was stopped" + (", its completed rounds kept" if during == "the train stage" else "")
        else:
            what = f"stopped while {during}"
        heading, reason = "Stopped", f"{type(exc).__name__} (a cancel or Ctrl-C): {what}"
    return (f"### {heading}\n\n- stages run before it {heading.lower()}: {', '.join(ran) or 'none'}\n- reason: "
            f"{reason}\n- params.yaml: {put_back}\n")


def _stage(path: Path, stage: str) -> dict:
    """One stage; it stops the run when a param the stage reads changed in params.yaml while it ran (DVC records the
    params it reads after the stage, so dvc.lock would claim values the stage did not run with). An edit to other
    params or comments is left to the stages after it, which read the file as it is then."""
    seen = path.read_text()
    done = stage_task(stage)
    now = path.read_text()
    if now != seen:
        changed = _changed_params(stage, seen, now)
        if changed != []:
            what = f"params.yaml: {', '.join(changed)}" if changed else "params.yaml"
            raise PipelineError(f"{what} changed while the {stage} stage ran, so dvc.lock records values it did not "
                                f"run with; edit params.yaml between runs, and run `dvc repro -f {stage}` (then `dvc "
                                "repro`) to run it with the file as it is now")
    return done


def _changed_params(stage: str, before: str, after: str) -> list[str] | None:
    """The params of `stage` (its `params:` in dvc.yaml and the `${...}` its definition interpolates) whose values
    differ between two texts of params.yaml; None where that cannot be told (dvc.yaml or a text that does not parse,
    a params entry of another file)."""
    import yaml

    try:
        spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]
        old, new = yaml.safe_load(before), yaml.safe_load(after)
    except Exception:
        return None
    keys = [k for k in spec.get("params") or [] if isinstance(k, str)]
    if len(keys) != len(spec.get("params") or []) or not isinstance(old, dict) or not isinstance(new, dict):
        return None
    keys += re.findall(r"\$\{\s*([\w.]+)\s*\}", json.dumps(spec))

    def value(doc: dict, key: str):
        for part in key.split("."):
            doc = doc.get(part) if isinstance(doc, dict) else None
        return doc

    return sorted({k for k in keys if value(old, k) != value(new, k)})


def _put_back(path: Path, original: str, rounds: tuple[int, int] | None, logger, owed: int = 0) -> str:
    """After a failed run: params.yaml as the run found it, except that train.rounds keeps the rounds that did complete
    (the next run resumes after them; putting back fewer would refuse every later run) and the `owed` ones: rounds the
    run added for prompts added to the split (and to catch up with rounds trained beyond train.rounds), which the next
    run trains. It could not ask for them again: once a round has run, those prompts are in its recorded split and no
    longer new, so a run that failed halfway through them would leave the rest untrained. Only `more_rounds` is put
    back (asked again, it would count twice). A file someone edited during the run is left as it is. Returns what it
    did, in words (the failed run's artifact says it)."""
    from stages.io import write_text

    text = path.read_text()
    if text == original:
        return "as the run found it"
    if rounds is None or text != _with_rounds(original, rounds[1]):
        logger.warning("params.yaml was edited during the failed run: left as it is (train.rounds there: %s)",
                       _rounds_line(text)[0] if re.search(r"(?m)^train:", text) else "?")
        return "edited during the run: left as it is"
    import yaml

    from stages.loop.resume import MANIFEST, ROUND_DIR
    from stages.params import TrainParams

    default = TrainParams.model_fields["rounds_dir"].default  # read leniently: this runs on the failure path
    rounds_dir = Path((yaml.safe_load(original).get("train") or {}).get("rounds_dir") or default)
    done = sum(1 for d in (rounds_dir.iterdir() if rounds_dir.is_dir() else ())
               if ROUND_DIR.match(d.name) and (d / MANIFEST).is_file())
    keep = min(max(rounds[0] + owed, done), rounds[1])
    write_text(_with_rounds(original, keep), path)
    if keep > rounds[0]:
        why = f"{done} rounds are complete" + (f", {owed} were added for new prompts" if owed else "")
        logger.warning("train.rounds kept at %d, not put back to %d: %s (the next run resumes and trains up to %d)",
                       keep, rounds[0], why, keep)
        return f"put back, except train.rounds kept at {keep} ({why})"
    return "put back as the run found it"


def _with_rounds(text: str, rounds: int) -> str:
    _, m = _rounds_line(text)
    return text[: m.start(2)] + str(rounds) + text[m.end(2):]


def _run_artifact(markdown: str) -> None:
    """The `rloo-pipeline-run` artifact every scheduled run leaves: nothing to do, what it did, or why it failed."""
    create_markdown_artifact(markdown, key="rloo-pipeline-run", description="what this run did")


def _artifacts(summary: dict) -> None:
    ran = [s["stage"] for s in summary["stages"] if s["ran"]]
    lines = ["### What this run did", "", f"- stages run: {', '.join(ran) or 'none'}",
             f"- prompts added since the last round: {summary['new_prompts']}"]
    if summary["rounds"]:
        lines.append(f"- train.rounds: {summary['rounds'][0]} -> {summary['rounds'][1]}")
    _run_artifact("\n".join(lines) + "\n")
    metrics = Path("metrics/eval.json")
    if metrics.is_file():
        ev = json.loads(metrics.read_text())
        rows = [{"metric": k, "value": round(v, 4) if isinstance(v, float) else v} for k, v in ev.items()
                if not isinstance(v, (dict, list))]
        create_table_artifact(rows, key="rloo-heldout-metrics", description="held-out metrics (metrics/eval.json)")
    report = Path("reports/report.md")
    if report.is_file():  # the report's text (its plots are PNG files beside it, in reports/)
        text = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", report.read_text())
        create_markdown_artifact(text[:60_000], key="rloo-report", description="reports/report.md")


def main(argv: list[str] | None = None) -> None:
    from flows.api import prefect_api

    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the whole pipeline as one flow.")
    ap.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    ap.add_argument("--more-rounds", type=int, default=0, help="raise train.rounds by N and train N more rounds")
    args = ap.parse_args(argv)
    import signal

    def hangup(*_):  # the terminal went away: stop as at a Ctrl-C (the stage's process group is stopped first)
        raise KeyboardInterrupt("hangup")

    # (not under `nohup`, which leaves SIGHUP ignored on purpose)
    before = signal.signal(signal.SIGHUP, hangup) if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL else None
    try:
        with prefect_api():
            summary = pipeline_flow(params_path=args.params, more_rounds=args.more_rounds)
    finally:
        if before is not None:
            signal.signal(signal.SIGHUP, before)
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_cli(main)
