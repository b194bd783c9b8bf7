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
