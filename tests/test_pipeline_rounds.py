"""flows/pipeline.py's edit of params.yaml for `more_rounds` (a scheduled run that adds rounds): only the number of
`train.rounds` changes, comments and layout stay, and a file it cannot edit safely is refused with the fix. The flow
itself runs against a real Prefect server in the slow tests (tests/test_deployment.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.pipeline import raise_rounds
from stages.errors import PipelineError

PARAMS = """\
base:
  seed: 42           # the run's seed
  rounds: 3          # not train.rounds: must stay
train:
  # how long the job runs
  rounds: 12         # rounds of sample -> score -> advantage -> update
  prompts_per_round: 8
evaluate:
  rounds: 5
"""


def test_more_rounds_raise_only_train_rounds_and_keep_the_rest(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    assert raise_rounds(path, 4) == (12, 16)
    assert path.read_text() == PARAMS.replace("  rounds: 12 ", "  rounds: 16 ")
    assert raise_rounds(path, 1) == (16, 17)


@pytest.mark.parametrize("text,phrase", [
    ("base:\n  seed: 1\n", "no `train:` section"),
    ("train:\n  prompts_per_round: 8\nevaluate:\n  rounds: 5\n", "`train.rounds` is not set"),
])
def test_a_params_file_without_train_rounds_is_refused_and_left_alone(tmp_path, text, phrase):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=phrase):
        raise_rounds(path, 2)
    assert path.read_text() == text


def _rounds_done(tmp_path, n: int) -> None:
    for r in range(n):
        (tmp_path / "data" / "rounds" / f"round={r:04d}").mkdir(parents=True)
        (tmp_path / "data" / "rounds" / f"round={r:04d}" / "manifest.json").write_text("{}")
    (tmp_path / "data" / "rounds" / f"round={n:04d}").mkdir()  # a partial round: no manifest, not complete


@pytest.mark.parametrize("done, kept", [(12, 12), (11, 12), (14, 14), (16, 16)])
def test_a_failed_run_puts_params_back_but_keeps_the_rounds_it_completed(tmp_path, monkeypatch, done, kept):
    """A scheduled run that raised train.rounds 12 -> 16 and then failed: params.yaml as it was, except that
    train.rounds keeps the rounds that completed (putting back 12 after 14 complete rounds would refuse every later
    run: '12 rounds asked, but 14 are complete')."""
    from flows.pipeline import _put_back

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    _rounds_done(tmp_path, done)
    rounds = raise_rounds(path, 4)
    said = _put_back(path, PARAMS, rounds, logging.getLogger("t"))
    assert path.read_text() == PARAMS.replace("  rounds: 12 ", f"  rounds: {kept} ")
    # what the failed run's artifact says
    assert said == ("put back as the run found it" if kept == 12 else
                    f"put back, except train.rounds kept at {kept} ({done} rounds are complete)")


def test_a_failed_run_leaves_an_edit_made_during_it(tmp_path, monkeypatch, caplog):
    from flows.pipeline import _put_back

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    rounds = raise_rounds(path, 4)
    edited = path.read_text().replace("seed: 42", "seed: 7")
    path.write_text(edited)
    assert _put_back(path, PARAMS, rounds, logging.getLogger("t")) == "edited during the run: left as it is"
    assert path.read_text() == edited and "edited during the failed run: left as it is (train.rounds there: 16)" in caplog.text
    path.write_text(PARAMS)
    assert _put_back(path, PARAMS, None, logging.getLogger("t")) == "as the run found it"  # nothing written
    assert path.read_text() == PARAMS


@pytest.mark.parametrize("output, why", [
    ("running...\nerror: reward `acc` raised KeyError: 'answer'\nERROR: failed to reproduce 'train': failed to run: "
     "python -m flows.train, exited with 2\n",
     "reward `acc` raised KeyError: 'answer' (ERROR: failed to reproduce 'train': failed to run: python -m flows.train, "
     "exited with 2)"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\nIsADirectoryError: [Errno 21] metrics/eval.json\n"
     "ERROR: failed to reproduce 'evaluate': exited with 1\n",
     "IsADirectoryError: [Errno 21] metrics/eval.json (ERROR: failed to reproduce 'evaluate': exited with 1)"),
    ("ERROR: unexpected error - lock held\n", "ERROR: unexpected error - lock held"),
    # a stage killed while its progress bar was drawn: DVC's line follows the bar's last frame on the same line
    ("logp ref:   0%|          | 0/2 [00:00<?, ?it/s]ERROR: failed to reproduce 'train': exited with -9\n",
     "ERROR: failed to reproduce 'train': exited with -9"),
    # DVC's own lock: who holds it, not only DVC's first line
    ("ERROR: '/w/metrics/eval.json' is busy, it is being blocked by:\n  (PID 77): dvc repro -f train evaluate\n\n"
     "If there are no processes with such PIDs, you can manually remove '.dvc/tmp/rwlock' and try again.\n",
     "'/w/metrics/eval.json' is busy, it is being blocked by: (PID 77): dvc repro -f train evaluate: another dvc "
     "command of this checkout holds it; run again once it has finished (a scheduled run waits for it up to "
     "RLOO_LOCK_WAIT_S)"),
])
def test_a_failed_stage_says_its_own_reason(output, why):
    """The pipeline's error carries the stage's own `error:` line or its traceback's last line, not only DVC's
    'failed to reproduce' summary."""
    from flows.pipeline import _why

    assert _why(output) == why


def test_a_scheduled_run_waits_for_dvcs_lock_held_by_a_shell_dvc_command(tmp_path, monkeypatch):
    """A `dvc repro` typed in a shell holds DVC's rwlock on its stage's files (the run lock only while its train stage
    runs): a deployment's run waits for it as it waits for the run lock, and a command at a terminal fails at once,
    naming the holder. Real DVC on a real repo; the holder is a live process recorded in DVC's rwlock file."""
    import json
    import subprocess
    import sys
    import threading

    import flows.pipeline as pipeline

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "-q"], check=True)
    Path("dvc.yaml").write_text("stages:\n  make:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"write": {str(tmp_path / "out.txt"): {"pid": holder.pid, "cmd": "dvc repro -f make"}}, "read": {}}
        Path(".dvc/tmp").mkdir(exist_ok=True)
        Path(".dvc/tmp/rwlock").write_text(json.dumps(lock))
        logs = []
        class Logger:  # what the flow run's logger is told
            def info(self, msg, *args):
                logs.append(msg % args)

        monkeypatch.setattr(pipeline, "get_run_logger", Logger)
        monkeypatch.setattr(pipeline, "DVC_RETRY_S", 0.3)
        monkeypatch.setattr("stages.loop.lock.deployment_wait_s", lambda: 0.0)  # a command typed at a terminal
        with pytest.raises(PipelineError, match=rf"is busy, it is being blocked by: \(PID {holder.pid}\): dvc repro -f "
                           r"make: another dvc command of this checkout holds it"):
            pipeline._dvc("repro", "make")
        assert not Path("out.txt").exists()
        monkeypatch.setattr("stages.loop.lock.deployment_wait_s", lambda: 60.0)  # a deployment's run
        threading.Timer(2.0, lambda: (holder.kill(), holder.wait())).start()  # reaped: no pid left
        proc = pipeline._dvc("repro", "make")  # waits until the holder is gone (DVC drops a dead PID's entry)
        assert Path("out.txt").read_text().strip() == "hi" and "Running stage 'make'" in proc.stdout
        assert len(logs) == 1 and logs[0].startswith("waiting for DVC's lock: ") and f"(PID {holder.pid})" in logs[0]
    finally:
        holder.kill()


def test_a_scheduled_run_catches_up_with_rounds_trained_beyond_train_rounds(tmp_path, monkeypatch):
    """`python -m flows.train --rounds 6` trained past params.yaml's train.rounds (4): a scheduled run then raises
    train.rounds to the rounds complete (plus `more_rounds`) instead of failing every night with "4 rounds asked, but 6
    complete"; rounds of another run (the configuration changed) do not count, they are archived."""
    from conftest import repo_params
    from test_loop_resume import write_round

    from flows.pipeline import plan_rounds

    monkeypatch.chdir(tmp_path)
    params = repo_params(train={"rounds": 4})
    for r in range(6):
        write_round(params.train, r, params.identity())
    assert plan_rounds(params, 0, 1.0) == (2, [])
    assert plan_rounds(params, 3, 1.0) == (5, [])
    other = repo_params(train={"rounds": 4}, base={"seed": 123})
    assert other.identity() != params.identity() and plan_rounds(other, 1, 1.0) == (1, [])


@pytest.mark.parametrize("text, rounds", [
    ("train:   # the training loop\n  # how long\n  rounds: 7  # rounds\nsample:\n  k: 4\n", 7),
    ("train: {rounds: 3}\n", 3),
    ("train: {prompts_per_round: 8, rounds: 5}  # short\nsample: {k: 4}\n", 5),
    ("train:\n  schedule:\n    rounds: 2\n  rounds: 9\n", 9),  # a nested `rounds:` is not train.rounds
])
def test_train_rounds_is_found_where_yaml_allows_it(tmp_path, text, rounds):
    """A comment after `train:`, a one-line `train: {...}` (what the error for a missing section used to advise, and
    then refused) and a deeper `rounds:` inside the section: the number raised is train.rounds, as YAML reads it."""
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert raise_rounds(path, 2) == (rounds, rounds + 2)
    assert yaml.safe_load(path.read_text())["train"]["rounds"] == rounds + 2
    assert path.read_text() == text.replace(f"rounds: {rounds}", f"rounds: {rounds + 2}", 1) or "schedule" in text


def test_a_failed_run_keeps_the_rounds_it_added_for_new_prompts(tmp_path, monkeypatch, caplog):
    """A run that raised train.rounds 12 -> 16 for new prompts and failed after round 13: those prompts are in round
    13's recorded split, so no later run would see them as new and ask for their rounds again; train.rounds stays
    at 16 (the next run trains up to it). What `more_rounds` added is put back: asked again, it would count twice."""
    from flows.pipeline import _put_back

    monkeypatch.chdir(tmp_path)
    _rounds_done(tmp_path, 13)
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    rounds = raise_rounds(path, 4)
    with caplog.at_level(logging.WARNING):
        said = _put_back(path, PARAMS, rounds, logging.getLogger("t"), owed=4)
    assert "rounds: 16 " in path.read_text() and "kept at 16" in said and "4 were added for new prompts" in said
    path.write_text(PARAMS)
    rounds = raise_rounds(path, 4)  # 1 round for new prompts, 3 of more_rounds: 12 + 1, and 13 are complete
    assert "kept at 13" in _put_back(path, PARAMS, rounds, logging.getLogger("t"), owed=1)
    assert "rounds: 13 " in path.read_text()


def _split_rounds(params, ids_by_round, split):
    """Complete rounds of `params`' run whose manifests record `split` as their train split."""
    import polars as pl

    from stages.loop.resume import MANIFEST, round_dir, split_record, write_manifest
    from stages.loop.writer import manifest_for

    for r, ids in enumerate(ids_by_round):
        m = manifest_for(r, params.identity(), "h", {}, {"reward": 0.0}, {}, None)
        m |= {"prompt_ids": ids, "train_split": split_record(pl.DataFrame({"prompt_id": split}))}
        path = round_dir(params.train.rounds_dir, r) / MANIFEST
        path.parent.mkdir(parents=True)
        write_manifest(m, path)


def test_new_prompts_add_rounds_only_to_the_run_they_continue(tmp_path, monkeypatch):
    """Prompts added to the split after the last round: their rounds are added once every round of this run is done,
    and not when the rounds in place are another configuration's (that run is moved aside, and this one starts at
    round 0 over the whole split with train.rounds as it is)."""
    import polars as pl
    from conftest import repo_params

    from flows.pipeline import plan_rounds
    from stages.io import write_table
    from stages.loop.warm import PREPARED_TRAIN

    monkeypatch.chdir(tmp_path)
    params = repo_params(train={"rounds": 2, "prompts_per_round": 2})
    _split_rounds(params, [["a", "b"], ["c", "d"]], ["a", "b", "c", "d"])
    write_table(pl.DataFrame({"prompt_id": ["a", "b", "c", "d", "e", "f", "g"]}), PREPARED_TRAIN)
    assert plan_rounds(params, 0, 1.0) == (2, ["e", "f", "g"])  # ceil(3 / 2)
    assert plan_rounds(params, 1, 2.0) == (4, ["e", "f", "g"])
    more = repo_params(train={"rounds": 3, "prompts_per_round": 2})  # not every round is done: no rounds added
    assert more.identity() == params.identity() and plan_rounds(more, 0, 1.0) == (0, ["e", "f", "g"])
    other = repo_params(train={"rounds": 2, "prompts_per_round": 2}, base={"seed": 123})
    assert other.identity() != params.identity() and plan_rounds(other, 0, 1.0) == (0, [])


@pytest.mark.parametrize("more, per_prompt, field", [(-1, 1.0, "more_rounds"), (0, -0.5, "rounds_per_new_prompt"),
                                                      (0, float("nan"), "rounds_per_new_prompt")])
def test_the_flows_own_parameters_are_checked(more, per_prompt, field):
    from flows.pipeline import check_arguments

    with pytest.raises(PipelineError, match=rf"^{field}: must be"):
        check_arguments(more, per_prompt)
    check_arguments(0, 0.0)


def test_dvcs_stages_run_with_this_interpreter_and_report_to_this_api(monkeypatch):
    """dvc.yaml's `python -m ...` finds this process's interpreter first (a worker started without its venv on PATH
    would run the stages with another python), and a training stage reports to the API this run uses."""
    import os
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import _stage_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4999/api"}):
        env = _stage_env()
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PATH"].endswith("/usr/bin:/bin") and env["PREFECT_API_URL"] == "http://127.0.0.1:4999/api"


# a stand-in for `dvc repro`: it ignores SIGINT while its stage runs, as DVC does, and waits for the stage
_DVC_LIKE = """
import signal, subprocess, sys
# "own": a torchrun launcher's rank, in a session of its own (out of the process group's reach): the launcher passes
# a SIGINT on to it; otherwise as DVC, which ignores SIGINT while its stage (in its group) runs
own = sys.argv[-1] == "own"
stage = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=own)
signal.signal(signal.SIGINT, (lambda *_: stage.send_signal(signal.SIGINT)) if own else signal.SIG_IGN)
sys.exit(stage.wait())
"""
# the stage: on SIGINT it writes what it completed and exits 130 (as `python -m flows.train` does), or ignores it
_STAGE = """
import os, signal, sys, time
out, polite = sys.argv[1], sys.argv[2] == "polite"
open(out + ".pid", "w").write(str(os.getpid()))
def stop(*_):
    signal.signal(signal.SIGINT, lambda *_: open(out, "a").write(" and was interrupted again"))
    time.sleep(0.5)  # its cleanup takes a while: a second SIGINT would cut it short
    open(out, "a").write("wrote its completed rounds")
    sys.exit(130)
signal.signal(signal.SIGINT, stop if polite else signal.SIG_IGN)
print("12:00:00 WARNING stages.loop.resume: the previous run was moved to data/archive/x", file=sys.stderr, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("polite, session", [(True, "same"), (False, "same"), (True, "own"), (False, "own")])
def test_a_stopped_pipeline_stops_its_stage_before_it_lets_go(tmp_path, monkeypatch, caplog, polite, session):
    """A cancel (Prefect raises SIGTERM as an exception in the flow) or a Ctrl-C while a stage runs: DVC passes no
    signal on, so the stage's process group is stopped here, and waited for, before the exception goes on (and the
    run lock is released): a training stage does not go on beside the next run. It gets SIGINT first, once (it writes
    its completed rounds), SIGKILL when it does not end in time, in its group or (a torchrun rank) in a session of its
    own whose launcher is killed. Its log lines reach this flow run's log as they come."""
    import signal
    import sys
    import time

    import flows.pipeline as pipeline

    class Stopped(BaseException):
        pass

    def cancel(*_):
        raise Stopped()

    monkeypatch.setattr(pipeline, "STOP_GRACE_S", 2.0)
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("flow-run"))
    out = tmp_path / "stage.out"
    old = signal.signal(signal.SIGALRM, cancel)
    signal.alarm(3)
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, logger="flow-run"), pytest.raises(Stopped):
            pipeline._run_stopping_with_us([sys.executable, "-c", _DVC_LIKE, _STAGE, str(out),
                                            "polite" if polite else "deaf", session], "train")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    took = time.monotonic() - t0
    pid = int(Path(f"{out}.pid").read_text())
    gone = False
    for _ in range(50):  # gone, or a zombie no init reaps (a container's)
        try:
            gone = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            gone = True
        if gone:
            break
        time.sleep(0.1)
    assert gone, "the stage outlived the pipeline's stop"
    if polite:
        assert out.read_text() == "wrote its completed rounds" and took < 3 + 2.0
    else:
        assert not out.exists() and took >= 3 + 2.0
    assert "train: the previous run was moved to data/archive/x" in caplog.messages


def test_a_dvc_command_waits_for_dvcs_repository_lock(tmp_path, monkeypatch, caplog):
    """Any dvc command holds DVC's repository lock for moments, and a `dvc repro` between its stages (saving a train
    stage's outputs to the cache): DVC gives up on it after 3 s, which could fail a scheduled run's stage after hours
    of training. The pipeline's dvc commands wait for it. Real DVC; the lock held by another process for 5 s."""
    import subprocess
    import sys
    import time

    import flows.pipeline as pipeline

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], check=True)
    Path("dvc.yaml").write_text("stages:\n  make:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, zc.lockfile; held = zc.lockfile.LockFile("
                               "'.dvc/tmp/lock'); print('held', flush=True); time.sleep(5)"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="flows.pipeline"):
            proc = pipeline._dvc("status", "--json")
        assert proc.returncode == 0 and time.monotonic() - t0 > 3.5  # it waited past DVC's own 3 s
        # and said so: DVC's own progress line is off without a terminal
        said = [m for m in caplog.messages if m.startswith("waiting")]
        assert len(said) == 1 and said[0].startswith(
            f"waiting for DVC's repository lock .dvc/tmp/lock, held by PID {holder.pid} ({Path(sys.executable).name} "
            "-c import sys, time, zc.lockfile;") and said[0].endswith("...)")  # the command cut at 80 characters
    finally:
        holder.kill()
    assert pipeline.dvc_lock_holder() is None  # free again, and the probe did not take it
    assert pipeline._dvc("status", "--json").returncode == 0


def test_the_pipelines_own_stage_logs_reach_its_flow_run(caplog):
    """In the pipeline's process, what `stages.*` log (the run lock's wait, a run moved back from the archive) goes to
    the flow run's logger while the flow runs, once, and the logger is as it was afterwards."""
    from flows.pipeline import _to_run_log

    run_log = logging.getLogger("flow-run-log")
    before = logging.getLogger("stages").level, logging.getLogger("stages").propagate
    with caplog.at_level(logging.INFO):
        with _to_run_log(run_log):
            logging.getLogger("stages.loop.lock").warning("waiting for this checkout's lock")
            logging.getLogger("stages.loop.resume").info("the previous run is back in place")
        logging.getLogger("stages.loop.lock").warning("after the flow")
    mine = [(r.name, r.getMessage()) for r in caplog.records]
    assert mine[:2] == [("flow-run-log", "waiting for this checkout's lock"),
                        ("flow-run-log", "the previous run is back in place")]
    assert ("stages.loop.lock", "waiting for this checkout's lock") not in mine  # once, through the run's logger
    assert mine[2:] == [("stages.loop.lock", "after the flow")]
    assert (logging.getLogger("stages").level, logging.getLogger("stages").propagate) == before


def test_an_edit_during_a_stage_stops_the_run_only_where_the_stage_reads_it(tmp_path, monkeypatch):
    """params.yaml edited while a stage runs: DVC records the params the stage reads after it, so an edit to one of
    those (its `params:` in dvc.yaml, or a `${...}` its definition uses) stops the run naming the key; an edit to
    another stage's params, or to a comment, is left to the stages after it."""
    import flows.pipeline as pipeline

    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text("stages:\n  train:\n    cmd: python -m flows.train\n    deps:\n      - ${base.model_dir}\n"
                                "    params: [train, base.seed]\n")
    path = Path("params.yaml")
    text = "base:\n  seed: 1\n  model_dir: m\ntrain:\n  rounds: 2  # rounds\nevaluate:\n  greedy: true\n"

    def run_with_edit(old: str, new: str):
        path.write_text(text)
        monkeypatch.setattr(pipeline, "stage_task", lambda stage: (path.write_text(text.replace(old, new)),
                                                                   {"stage": stage, "ran": True})[1])
        return pipeline._stage(path, "train")

    assert run_with_edit("greedy: true", "greedy: false") == {"stage": "train", "ran": True}
    assert run_with_edit("# rounds", "# how many rounds")["ran"]
    for old, new, key in [("rounds: 2", "rounds: 3", "train"), ("seed: 1", "seed: 2", "base.seed"),
                          ("model_dir: m", "model_dir: n", "base.model_dir")]:
        with pytest.raises(PipelineError, match=rf"^params.yaml: {key} changed while the train stage ran, so dvc.lock "
                                                r"records values it did not run with; .*`dvc repro -f train`"):
            run_with_edit(old, new)
    Path("dvc.yaml").write_text("stages: [")  # what the stage reads cannot be told: any edit stops the run
    with pytest.raises(PipelineError, match=r"^params.yaml changed while the train stage ran"):
        run_with_edit("greedy: true", "greedy: false")


@pytest.mark.parametrize("nohup", [False, True])
def test_a_hangup_stops_the_pipeline_as_a_ctrl_c_unless_under_nohup(monkeypatch, nohup):
    """`python -m flows.pipeline` in a terminal that closes gets SIGHUP: it stops as at a Ctrl-C (its stage's process
    group stopped first, by the KeyboardInterrupt's way out of `_run_stopping_with_us`); under `nohup`, which leaves
    SIGHUP ignored on purpose, it goes on. The handler is put back afterwards either way. (The flow and its API are
    stood in for: what is tested is main()'s handling of the signal.)"""
    import contextlib
    import os
    import signal

    import flows.api
    import flows.pipeline as pipeline

    seen = []

    def flow(params_path, more_rounds):
        os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes while the flow runs
        seen.append("went on")
        return {"stages": []}

    monkeypatch.setattr(flows.api, "prefect_api", contextlib.nullcontext)
    monkeypatch.setattr(pipeline, "pipeline_flow", flow)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)
    try:
        if nohup:
            pipeline.main([])
            assert seen == ["went on"] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        else:
            with pytest.raises(KeyboardInterrupt, match="hangup"):
                pipeline.main([])
            assert seen == [] and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


_LOGS = """
import logging, sys
if sys.argv[1] == "prefect":
    import flows.train  # noqa: F401  what `python -m flows.train` imports before run_cli: Prefect's logging setup
from stages.errors import run_cli
def main(argv):
    logging.getLogger("stages.loop.resume").warning("the previous run was moved to data/archive/x")
    logging.getLogger("stages.loop.resume").info("removed data/rounds/round=0002 - the partial round 3")
run_cli(main)
"""


@pytest.mark.parametrize("stage", ["prefect", "plain"])
def test_the_stages_log_lines_are_recognised_in_the_format_they_come_in(stage):
    """The lines a stage logs reach the pipeline's flow-run log (`_STAGE_LOG`), whichever logging setup came first:
    run_cli's (a stage that does not import Prefect: evaluate, report) or Prefect's (`python -m flows.train`, where
    run_cli's basicConfig does nothing; its lines, a run moved to the archive, never reached the log before)."""
    import subprocess
    import sys

    from flows.pipeline import _STAGE_LOG

    proc = subprocess.run([sys.executable, "-c", _LOGS, stage], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = [m.groups() for m in map(_STAGE_LOG.match, (proc.stderr + proc.stdout).splitlines()) if m]
    assert found == [("WARNING", "stages.loop.resume", "the previous run was moved to data/archive/x"),
                     ("INFO", "stages.loop.resume", "removed data/rounds/round=0002 - the partial round 3")]


def test_a_cancelled_run_s_artifact_says_stopped_with_a_reason():
    """A cancel reaches the flow as Prefect's TerminationSignal, whose text is empty: the artifact said "Failed" with
    "reason: TerminationSignal: " and nothing after it."""
    from prefect.exceptions import TerminationSignal

    from flows.pipeline import _failure_note

    note = _failure_note(TerminationSignal(15), ["prepare"], "put back as the run found it", "the train stage")
    assert note == ("### Stopped\n\n- stages run before it stopped: prepare\n- reason: TerminationSignal (a "
                    "cancel or Ctrl-C): the train stage was stopped, its completed rounds kept\n- params.yaml: put "
                    "back as the run found it\n")
    # it says what it stopped: a run that was waiting for the lock ran nothing
    for during, said in (("waiting for the run lock", "stopped while waiting for the run lock"),
                         ("the evaluate stage", "the evaluate stage was stopped"), (None, "the run was stopped")):
        assert f"(a cancel or Ctrl-C): {said}\n" in _failure_note(KeyboardInterrupt(), [], "x", during)
    assert _failure_note(PipelineError("train.rounds: bad"), [], "x").startswith(
        "### Failed\n\n- stages run before it failed: none\n- reason: train.rounds: bad\n")
