"""The training command's malloc (stages.runtime: find_malloc, malloc_env, preload_malloc, malloc_in_use): tcmalloc
where installed, glibc's malloc with RLOO_MALLOC=system, any library by path; the command re-executes itself once
with the library preloaded, keeping its arguments and its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.errors import PipelineError
from stages.runtime import MALLOC_ENV, find_malloc

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys
log = sys.argv[1]
with open(log, "a") as f:
    f.write(json.dumps({"phase": "start", "pid": os.getpid()}) + "\\n")
from stages.runtime import malloc_in_use, preload_malloc
preload_malloc()
with open(log, "a") as f:
    f.write(json.dumps({"phase": "after", "pid": os.getpid(), "argv": sys.argv[1:], "malloc": malloc_in_use(),
                        "preload": os.environ.get("LD_PRELOAD", "")}) + "\\n")
"""


def run_child(tmp_path: Path, **env: str) -> list[dict]:
    log = tmp_path / "child.jsonl"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in (MALLOC_ENV, "LD_PRELOAD", "_RLOO_MALLOC_EXEC")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(log), "--flag", "a b"], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def libc_path() -> str:
    """This process's own libc: a real shared library that is harmless to preload."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        name = line.split()[-1]
        if Path(name).name.startswith("libc.so"):
            return name
    raise AssertionError("no libc in /proc/self/maps")


def test_find_malloc_settings(tmp_path, monkeypatch):
    assert find_malloc("system") is None
    with pytest.raises(PipelineError, match=r"RLOO_MALLOC: .*nope is not a file; set it to the path"):
        find_malloc(str(tmp_path / "nope"))
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"")
    assert find_malloc(str(lib)) == str(lib.resolve())
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    (d2 / "libtcmalloc.so.4").write_bytes(b"")
    assert find_malloc("auto", dirs=(str(d1), str(d2))) == str(d2 / "libtcmalloc.so.4")
    (d2 / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal build first: all a training process needs
    assert find_malloc("auto", dirs=(str(d1), str(d2))) == str(d2 / "libtcmalloc_minimal.so.4")
    assert find_malloc("auto", dirs=(str(d1),)) is None
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert find_malloc() is None


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD and /proc are Linux's")
def test_the_command_reexecutes_once_with_the_library_preloaded(tmp_path):
    libc = libc_path()
    start, start_again, after = run_child(tmp_path, RLOO_MALLOC=libc)
    assert start["phase"] == start_again["phase"] == "start" and after["phase"] == "after"  # once, no loop
    assert start["pid"] == start_again["pid"] == after["pid"]  # execve: the same process (locks name it by pid)
    assert after["argv"] == [str(tmp_path / "child.jsonl"), "--flag", "a b"] and after["preload"].split(":")[0] == libc


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD and /proc are Linux's")
def test_system_malloc_and_an_existing_preload_start_no_second_process(tmp_path):
    start, after = run_child(tmp_path, RLOO_MALLOC="system")
    assert (start["phase"], after["phase"], after["malloc"], after["preload"]) == ("start", "after", "glibc", "")
    libc = libc_path()
    start, after = run_child(tmp_path, RLOO_MALLOC=libc, LD_PRELOAD=libc)  # already there: nothing to add
    assert after["phase"] == "after" and after["preload"] == libc


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD and /proc are Linux's")
def test_auto_uses_the_installed_tcmalloc_or_glibc(tmp_path):
    """What a user's `python -m flows.train` gets: tcmalloc mapped into the process where one is installed (`make
    setup` installs it as root on Debian/Ubuntu), else glibc's malloc and one process."""
    found = find_malloc("auto")
    records = run_child(tmp_path, RLOO_MALLOC="auto")
    after = records[-1]
    if found is None:
        assert len(records) == 2 and after["malloc"] == "glibc"
    else:
        assert len(records) == 3 and after["malloc"] == Path(found).resolve().name
        assert after["preload"].split(":")[0] == found


@pytest.mark.parametrize("command", ["flows.train", "stages.evaluate", "flows.serve"])
def test_a_bad_setting_is_one_line_from_each_command_that_preloads(tmp_path, command):
    """The training, evaluation (its vLLM engine asks for tcmalloc too) and serving commands preload the library
    first thing: a bad setting is their one line, before anything else runs."""
    env = {**os.environ, MALLOC_ENV: str(tmp_path / "missing.so")}
    proc = subprocess.run([sys.executable, "-m", command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: RLOO_MALLOC: {tmp_path / 'missing.so'} is not a file; set it "
                                                "to the path of a malloc library (e.g. libtcmalloc_minimal.so.4), "
                                                "to auto, or to system"]


def test_prefect_failure_lines_of_bad_input_are_dropped_only_where_the_error_line_tells_it():
    """Inside `bad_input_exits` (a command that prints the one `error:` line) Prefect's task and flow failure lines
    for a PipelineError go; a bug's failure lines stay, and outside (a Prefect worker's flow run, whose log is its
    report) every line stays, a PipelineError's without its traceback."""
    import logging

    from conftest import LogRecords
    from stages.errors import bad_input_exits, quiet_bad_input_tracebacks

    logger, seen = logging.getLogger("test.prefect.task_runs"), LogRecords()
    quiet_bad_input_tracebacks("test.prefect.task_runs")
    logger.addHandler(seen)
    logger.propagate = False
    logger.setLevel(logging.INFO)

    def prefect_says(exc: Exception) -> None:
        try:
            raise exc
        except Exception as e:
            logger.error("Task run failed with exception: %r", e, exc_info=True)
        logger.error(f"Finished in state Failed('Task run encountered an exception {type(exc).__name__}: {exc}')")
        logger.info("Finished in state Completed()")

    try:
        prefect_says(PipelineError("reward `judge`: the judge is down"))  # a worker: kept, no traceback
        with pytest.raises(SystemExit) as exit_, bad_input_exits():
            prefect_says(PipelineError("reward `judge`: the judge is down"))
            prefect_says(ValueError("a bug"))
            raise PipelineError("reward `judge`: the judge is down")
    finally:
        logger.removeHandler(seen)
    assert exit_.value.code == 2
    bad, bug = "PipelineError('reward `judge`: the judge is down')", "ValueError('a bug')"
    assert [(r.getMessage(), r.exc_info is not None) for r in seen.records] == [
        (f"Task run failed with exception: {bad}", False),  # outside: kept, without the traceback
        ("Finished in state Failed('Task run encountered an exception PipelineError: reward `judge`: the judge is "
         "down')", False),
        ("Finished in state Completed()", False),
        ("Finished in state Completed()", False),  # inside: the bad input's two lines went, the rest stays
        (f"Task run failed with exception: {bug}", True),
        ("Finished in state Failed('Task run encountered an exception ValueError: a bug')", False),
        ("Finished in state Completed()", False)]


def test_a_full_disk_is_told_in_one_line_whatever_library_hit_it(capsys):
    """A full disk, as the OS, polars (its text, polars 1.x) and safetensors report it, or raised from deeper down (a
    background write's failure re-raised), ends a command with one `error: disk full` line and exit code 2; other
    errors (a bug, a missing file) stay tracebacks. test_advantage fills a real filesystem through a stage's CLI."""
    import errno

    from polars.exceptions import ComputeError

    from stages.errors import bad_input_exits, disk_full, disk_full_message

    os_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "data/rounds/round=0003/samples.parquet")
    polars_full = ComputeError("parquet: File out of specification: underlying IO error: No space left on device "
                               "(os error 28)")
    safetensors_full = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    def writer_full():
        try:
            raise os_full
        except OSError as exc:
            raise RuntimeError("the round's write failed") from exc

    for fail in (os_full, polars_full, safetensors_full, writer_full):
        with pytest.raises(SystemExit) as exit_, bad_input_exits():
            fail() if callable(fail) else _raise(fail)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: disk full") and "No space left on device" in err[0], err
        assert "du -sh data/archive/*" in err[0] and "run the command again" in err[0]
    assert disk_full_message(os_full).startswith("disk full writing data/rounds/round=0003/samples.parquet: No space "
                                                 "left on device, ")
    assert " GiB free there; " in disk_full_message(os_full)
    for bug in (ValueError("a bug"), OSError(errno.ENOENT, "No such file or directory", "x.parquet")):
        assert disk_full(bug) is None and disk_full_message(bug) is None
        with pytest.raises(type(bug)), bad_input_exits():
            raise bug
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", "models/policy/model.safetensors")
    assert disk_full_message(quota).startswith("disk full writing models/policy/model.safetensors: Disk quota "
                                               "exceeded, ")


def test_a_path_the_command_may_not_write_is_told_in_one_line(capsys, tmp_path):
    """A read-only mount or a dir's permissions (EROFS, EACCES, EPERM naming a path), raised where a stage writes or
    from deeper down, ends a command with one `error:` line naming the path and exit code 2, not a traceback; an
    error of that kind without a path (os.kill's), or a missing file, stays a traceback. (Permission bits do not
    stop root, which these tests may run as: the errors are made here; the flow's rounds dir bind-mounted read-only
    gave `OSError: [Errno 30] Read-only file system: 'advantages.parquet'` and two tracebacks before.)"""
    import errno

    from stages.errors import bad_input_exits, not_writable, not_writable_message

    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "data/rounds/round=0002/advantages.parquet")
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "models/policy", None, "models/.policy.old-x/d")

    def wrapped():
        try:
            raise ro
        except OSError as exc:
            raise RuntimeError("the round's write failed") from exc

    for fail, where in ((ro, "data/rounds/round=0002/advantages.parquet"), (wrapped, "data/rounds/round=0002/"
                        "advantages.parquet"), (denied, "models/policy -> models/.policy.old-x/d")):
        with pytest.raises(SystemExit) as exit_, bad_input_exits():
            fail() if callable(fail) else _raise(fail)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {where}: "), err
        assert err[0].endswith("what was complete is kept: give this user access to it (its permissions, or a "
                               "read-only mount) or point the params that name it elsewhere, and run the command again")
    assert "Read-only file system" in not_writable_message(ro) and "Permission denied" in not_writable_message(denied)
    # a temporary name the write was creating is not there to fix: its dir is named
    staged = PermissionError(errno.EPERM, "Operation not permitted", str(tmp_path / ".policy.tmp-mjeu3ifh"))
    assert not_writable_message(staged).startswith(f"{tmp_path} (writing .policy.tmp-mjeu3ifh in it): Operation not "
                                                   "permitted; what was complete is kept")
    for bug in (PermissionError(errno.EPERM, "Operation not permitted"), FileNotFoundError(2, "No such file", "x")):
        assert not_writable(bug) is None
        with pytest.raises(type(bug)), bad_input_exits():
            raise bug


def _raise(exc: BaseException):
    raise exc


@pytest.mark.parametrize("end, code, prelude", [
    ("", 0, ""), ("sys.exit(3)", 3, ""), ("raise PipelineError('x: bad')", 2, ""),
    # a Python without the private exit APIs exit_now uses: Python's own exit path, the same outcome
    ("sys.exit(3)", 3, "del atexit._run_exitfuncs"), ("raise PipelineError('x: bad')", 2, "del atexit._run_exitfuncs")])
def test_a_command_ends_without_teardown_but_with_its_threads_and_exit_handlers(tmp_path, end, code, prelude):
    """`run_cli` ends through `exit_now` (os._exit, no interpreter teardown): the exit code is the command's, a
    non-daemon thread still finishes, every exit handler still runs (logging's flush among them), stdout is flushed."""
    script = tmp_path / "cmd.py"
    script.write_text(f"""
import atexit, logging, sys, threading, time
from pathlib import Path
from stages.errors import PipelineError, run_cli
{prelude}

def main(argv):
    atexit.register(lambda: Path("{tmp_path}/handler").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.5), Path("{tmp_path}/thread").write_text("done"))).start()
    logging.getLogger("stages.x").addHandler(logging.FileHandler("{tmp_path}/log"))
    logging.getLogger("stages.x").info("logged")
    print("printed", end="")
    {end}

run_cli(main)
""")
    out = subprocess.run([sys.executable, str(script)], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == code, out.stderr
    assert out.stdout.endswith("printed")
    assert (tmp_path / "handler").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "log").read_text() == "logged\n"
    assert ("error: x: bad" in out.stderr) == (code == 2)


def test_the_dvc_checkout_advice_is_given_only_where_dvc_has_a_copy(tmp_path, monkeypatch):
    """A real `dvc repro` records a rounds dir and a file; a round trained after it (by `python -m flows.train`) is not
    in DVC's records, and `dvc checkout --force` of it deletes it: the advice says DVC has no copy there instead, and
    so for a round whose manifest is not the one DVC recorded (another run's round of the same number). A recorded
    copy whose cache entry is gone: `dvc pull` where a remote is set. Where the records cannot tell, the usual
    advice."""
    import shutil

    from stages.errors import checkout_fix, dvc_copy

    dvc = str(Path(sys.executable).with_name("dvc"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))  # not the user's own DVC settings
    assert dvc_copy("data/rounds/round=0000") is None  # no DVC repo here
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([dvc, "init", "-q"], check=True)
    write = ("import pathlib as p; d = p.Path('data/rounds/round=0000'); d.mkdir(parents=True); "
             "(d / 'samples.parquet').write_text('a'); (d / 'manifest.json').write_text('{}'); "
             "p.Path('data/eval.json').write_text('{}')")
    subprocess.run([dvc, "stage", "add", "-q", "-n", "train", "-o", "data/rounds", "-o", "data/eval.json",
                    f'{sys.executable} -c "{write}"'], check=True)
    before = Path("data/rounds/round=0000/manifest.json")  # a round trained before any `dvc repro`: no dvc.lock
    before.parent.mkdir(parents=True)
    before.write_text("{}")
    assert dvc_copy(before) == "absent" and checkout_fix(before).startswith("DVC has no copy of this round")
    subprocess.run([dvc, "checkout", "--force", str(before)], capture_output=True)
    assert not before.exists()  # what the advice says DVC would do (the checkout it used to advise)
    Path("data/rounds.dvc").write_text("outs:\n- path: rounds\n")  # a `dvc add data/rounds`: its record is not read
    assert dvc_copy("data/rounds/round=0000/manifest.json") is None
    Path("data/rounds.dvc").unlink()
    Path("data/dvc.yaml").write_text("stages: {}\n")  # stages of a dir above it, with records of their own
    assert dvc_copy("data/rounds/round=0000/manifest.json") is None
    Path("data/dvc.yaml").unlink()
    subprocess.run([dvc, "repro", "-q"], check=True, capture_output=True)
    later = Path("data/rounds/round=0001/samples.parquet")
    later.parent.mkdir()
    later.write_text("trained after the last dvc repro")
    Path("data/rounds2").mkdir()  # a dir whose name only starts like the output's
    assert dvc_copy("data/rounds/round=0000/samples.parquet") == "cached"
    assert dvc_copy(Path("data/rounds/round=0000").absolute()) == "cached"
    assert dvc_copy("data/rounds") == dvc_copy("data/rounds/") == dvc_copy("data/eval.json") == "cached"
    assert dvc_copy(later) == dvc_copy(later.parent) == "absent"
    assert dvc_copy("data/rounds2/x") == dvc_copy("models/policy") == "absent"  # no output holds them
    assert checkout_fix("data/rounds/round=0000/samples.parquet") == (
        "restore it with `dvc checkout --force data/rounds/round=0000/samples.parquet` (DVC's copy, when DVC cached "
        "this round)")
    assert checkout_fix(later) == (
        "DVC has no copy of this round (dvc.lock does not record it, or its cache entry is gone), so `dvc checkout` "
        "would delete it instead of restoring it: put it back from a copy of yours")
    subprocess.run([dvc, "checkout", "--force", str(later)], check=True, capture_output=True)
    assert not later.exists()  # what the advice says DVC would do
    assert checkout_fix(later).endswith("so `dvc checkout` cannot restore it: put it back from a copy of yours")
    manifest = Path("data/rounds/round=0000/manifest.json")
    manifest.write_text('{"identity": "another run"}')  # round 1 of a run trained since: DVC's round 1 is not it
    assert dvc_copy("data/rounds/round=0000/samples.parquet") == "absent"
    assert dvc_copy(manifest) == "cached"  # the manifest asked about may be the damaged one: it is no evidence
    manifest.write_text('{"rou')  # damaged: DVC's copy is the one to put back
    assert dvc_copy(manifest) == dvc_copy("data/rounds/round=0000/samples.parquet") == "cached"
    manifest.write_text("{}")
    monkeypatch.chdir(tmp_path / "data")  # not the repo's root: DVC's paths are relative to it
    assert dvc_copy("rounds/round=0000/samples.parquet") is None
    monkeypatch.chdir(tmp_path)
    Path("data/eval.json").unlink()
    next(p for p in Path(".dvc/cache/files/md5").rglob("*") if p.is_file() and p.read_text() == "a").unlink()
    assert dvc_copy("data/rounds/round=0000") == dvc_copy("data/rounds/round=0000/samples.parquet") == "recorded"
    assert dvc_copy("data/rounds/round=0000/manifest.json") == "cached"  # that file's entry is still there
    assert checkout_fix("data/eval.json", "that file").startswith("restore it with `dvc checkout data/eval.json`")
    assert checkout_fix("data/rounds/round=0000/samples.parquet").startswith("DVC has no copy of this round")
    subprocess.run([dvc, "remote", "add", "-q", "-d", "store", str(tmp_path / "store")], check=True)
    assert checkout_fix("data/rounds/round=0000/samples.parquet") == (
        "restore it with `dvc pull --force data/rounds/round=0000/samples.parquet` (DVC's copy on its remote, when it "
        "was pushed)")
    shutil.rmtree(".dvc/cache")  # a fresh clone, or `dvc gc` of everything: dvc.lock's record alone
    assert dvc_copy("data/eval.json") == "recorded"  # a file output: the record is that file
    assert dvc_copy("data/rounds/round=0000/samples.parquet") is None  # no listing: which files, which run, unknown
    assert dvc_copy(later) is None
    Path(".dvc/config").write_text("[core]\n    remote = store\n[ ]\n['remote \"store\"']\n    url = /x#y\n")
    assert checkout_fix("data/eval.json", "that file") == (  # nothing in the way (deleted above): no --force
        "restore it with `dvc pull data/eval.json` (DVC's copy on its remote, when it was pushed)")
    Path(".dvc/config.local").write_text("[cache]  # on the NAS\n    dir = /elsewhere/cache\n")
    assert dvc_copy("data/eval.json") is None  # a cache elsewhere: cannot tell
    Path(".dvc/config.local").unlink()
    Path("dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    outs: [data/rounds]\n")  # edited by hand
    assert dvc_copy("data/rounds/round=0000") is None
