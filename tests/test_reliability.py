"""Hostile and unlucky users, with real processes on a tiny project: one run per checkout (two real processes), a
damaged round or model file refused with one line naming it (flow, report, evaluate), the temporary Prefect server
gone with a killed flow, Ctrl-C one line, `--rounds` checked, a bad new setting failing before the old run moves,
a new run killed outright in round 1 undone at the next start, and an inconsistent state refused without deleting
anything."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from project import BIN, PY, make_project, run, run_env
from test_resume import SLOW_REWARD

pytestmark = pytest.mark.slow
ROUNDS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny project with a finished 2-round run and its evaluation (the tests copy it before they damage it)."""
    root = tmp_path_factory.mktemp("rel")
    proj = make_project(root, tiny_model_dir, **{"train.rounds": ROUNDS, "train.eval_every": 0})
    (proj / "slow_reward.py").write_text(SLOW_REWARD)
    import yaml

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"].append({"name": "slow", "function": "slow_reward:score", "weight": 0.0})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = run_env(root)
    run([str(BIN / "dvc"), "repro"], proj, env)
    return root, proj, env


@pytest.fixture
def copy(trained, tmp_path):
    root, proj, env = trained
    dest = tmp_path / "project"
    shutil.copytree(proj, dest, symlinks=True)
    return dest, run_env(tmp_path)


def one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "in state Failed" not in proc.stdout + proc.stderr, proc.stderr[-3000:]  # Prefect's lines would repeat it
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for p in parts:
        assert p in last, last
    return last


def files_of(proj: Path) -> dict[str, bytes]:
    return {str(p.relative_to(proj)): p.read_bytes() for d in ("data/rounds", "models/policy")
            for p in sorted((proj / d).rglob("*")) if p.is_file()}


def held_in_round_3(proj: Path, env: dict) -> subprocess.Popen:
    """`flows.train --rounds 3` in its own session, returned once it sleeps inside round 3's scoring (the slow
    reward's first call in that process: rounds 1-2 are done), holding the run lock."""
    flow = subprocess.Popen([PY, "-m", "flows.train", "--rounds", "3"], cwd=proj, env={**env, "SLOW_REWARD_CALL": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (proj / "data" / "rounds" / "round=0002" / "samples.parquet").exists():
        if flow.poll() is not None or time.time() > deadline:
            if flow.poll() is None:
                os.killpg(flow.pid, signal.SIGKILL)
            raise AssertionError(f"the flow did not reach round 3: {flow.stderr.read()[-3000:]}")
        time.sleep(0.3)
    return flow


def test_a_second_run_in_the_checkout_is_refused_at_once(copy):
    proj, env = copy
    before = files_of(proj)
    # The first run sleeps inside its round-3 scoring (the reward's 1st call of that process) and holds the lock.
    first = held_in_round_3(proj, env)
    try:
        t0 = time.time()
        # a second run with other params would start clean and move the first one's rounds away
        second = run([PY, "-m", "flows.train", "--params", "params.yaml", "--rounds", "4"], proj,
                     env, check=False)
        line = one_line_error(second, "another run holds this checkout's lock", f"pid {first.pid}", "flows.train")
        assert time.time() - t0 < 60 and "since 20" in line
        repro = run([str(BIN / "dvc"), "repro", "train"], proj, env, check=False)  # dvc repro goes through it too
        assert repro.returncode != 0 and "another run holds this checkout's lock" in repro.stdout + repro.stderr
        for name, data in before.items():  # the first run's completed rounds are untouched
            if name.startswith("data/rounds/round=000"):
                assert (proj / name).read_bytes() == data, name

        # Kill only the flow's process: its temporary Prefect server goes with it, and the lock is free at once.
        import psutil

        children = [c for c in psutil.Process(first.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
        assert children, "the flow runs against its own temporary Prefect server"
        # at the lowest priority, every thread of it: its work (recording task runs from events) takes the cores the
        # round leaves idle
        nice = [os.getpriority(os.PRIO_PROCESS, t.id) for c in children for t in c.threads()]
        assert nice and set(nice) == {19}, nice
        for c in children:  # and its session's autogroup too, where the kernel groups by session
            group = Path(f"/proc/{c.pid}/autogroup")
            assert not group.exists() or group.read_text().split()[-1] == "19", group.read_text()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"the temporary Prefect server outlived the killed flow: {alive}"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    resumed = run([PY, "-m", "flows.train", "--rounds", "3"], proj, env)
    assert "resuming after round 2" in resumed.stdout + resumed.stderr


def test_ctrl_c_is_one_line_keeps_the_completed_rounds_and_the_server_goes(copy):
    """Ctrl-C at a terminal (SIGINT to the foreground process group) mid-round: one line and exit code 130, no
    traceback; the flow's temporary Prefect server, in its own session, is not hit by it, takes the flow's crashed
    state, and stops with it; the run then resumes."""
    import psutil

    proj, env = copy
    before = files_of(proj)
    flow = held_in_round_3(proj, env)
    try:
        servers = [c for c in psutil.Process(flow.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
        assert servers
        os.killpg(flow.pid, signal.SIGINT)  # what the terminal does: the flow's group, not the server's session
        _, err = flow.communicate(timeout=120)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
    assert flow.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: "), err[-3000:]
    assert "Crash detected" not in err and "Crashed(" not in err, err[-3000:]  # Prefect's four lines would repeat it
    assert "Connection refused" not in err  # the server lived to take the crashed state
    gone, alive = psutil.wait_procs(servers, timeout=15)
    assert not alive
    for name, data in before.items():
        if name.startswith("data/rounds/round=000"):
            assert (proj / name).read_bytes() == data, name
    resumed = run([PY, "-m", "flows.train", "--rounds", "3"], proj, env)
    assert "resuming after round 2" in resumed.stdout + resumed.stderr


def test_a_truncated_round_is_refused_by_the_flow_and_the_report(copy):
    proj, env = copy
    path = proj / "data" / "rounds" / "round=0000" / "samples.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    before = files_of(proj)
    one_line_error(run([PY, "-m", "flows.train", "--rounds", "3"], proj, env, check=False),
                   "data/rounds/round=0000/samples.parquet", "round 1 is damaged")
    one_line_error(run([PY, "-m", "stages.report"], proj, env, check=False),
                   "data/rounds/round=0000/samples.parquet", "round 1 is damaged")
    assert files_of(proj) == before  # nothing deleted, nothing rewritten
    status = run([str(BIN / "dvc"), "status"], proj, env)
    assert "train" in status.stdout  # DVC sees the damage too; the lock file still records the good file


def test_a_truncated_policy_file_is_named_by_its_field(copy):
    proj, env = copy
    weights = proj / "models" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    one_line_error(run([PY, "-m", "stages.evaluate"], proj, env, check=False), "train.checkpoint_dir")
    one_line_error(run([PY, "-m", "flows.train", "--rounds", "3"], proj, env, check=False), "train.checkpoint_dir")


def test_evaluate_takes_any_model_dir_as_policy_and_leaves_it_untouched(copy):
    """`--policy` may be another trainer's output (a plain transformers dir, no checkpoint.json): evaluating reads
    it; here the base model itself, so the KL to the reference (the same weights) is 0."""
    import json

    proj, env = copy
    base = proj / "models" / "base"
    before = {p: p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}
    run([PY, "-m", "stages.evaluate", "--policy", "models/base"], proj, env)
    metrics = json.loads((proj / "metrics" / "eval.json").read_text())
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["prompts"] > 0
    assert {p: p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()} == before


def test_a_removed_checkpoint_and_an_emptied_manifest_are_refused_without_deleting(copy):
    proj, env = copy
    manifest = proj / "data" / "rounds" / "round=0001" / "manifest.json"
    manifest.write_text("{}")
    before = files_of(proj)
    one_line_error(run([PY, "-m", "flows.train"], proj, env, check=False), "manifest lacks", "--restart")
    assert files_of(proj) == before
    manifest.unlink()
    shutil.rmtree(proj / "models" / "policy")
    before = files_of(proj)
    one_line_error(run([PY, "-m", "flows.train"], proj, env, check=False), "checkpoint is missing", "--restart")
    assert files_of(proj) == before
    out = run([PY, "-m", "flows.train", "--restart"], proj, env)  # the documented way out keeps the old run
    assert "moved to data/archive/" in out.stdout + out.stderr
    (archived,) = (proj / "data" / "archive").iterdir()
    assert (archived / "rounds" / "round=0000" / "manifest.json").is_file()


@pytest.mark.parametrize("change, named", [
    (lambda p: p["score"]["rewards"][0].update(function="no_such_module:score"), "no_such_module"),
    (lambda p: p["score"].update(ref_model="models/nonexistent"), "score.ref_model"),
    # a prompt that cannot fit the engine with its completion: said before the engine starts (max_model_len is not
    # part of the run's identity: a third round of the same run meets it)
    (lambda p: (p["sample"].update(max_model_len=16), p["train"].update(rounds=3)), "sample.max_model_len: prompt"),
    # a column a reward names that the prompts lack: known when the run loads, not only at round 1's scoring
    (lambda p: p["score"]["rewards"].append({"name": "qa", "function": "needs_answer:score", "weight": 1.0}),
     "'needs_answer:score' needs `answer`, which the prompts table lacks"),
    (lambda p: p["score"]["rewards"].append({"name": "em", "function": "exact_match", "weight": 1.0,
                                             "kwargs": {"column": "answer"}}), "needs the reference column `answer`"),
    # failures only round 1 can show: the old run has moved aside by then, and is put back (restore_run)
    (lambda p: p["score"]["rewards"].append({"name": "judge", "function": "judge_down:score", "weight": 1.0}),
     "reward `judge`"),
])
def test_a_bad_new_setting_fails_before_the_finished_run_is_moved_aside(copy, change, named):
    """A changed configuration moves the old run aside, but only once the new one has loaded: a reward that cannot
    be built or a reference that is not there fails with one line, and the finished run stays where it was; one
    that fails in round 1 (here a reward that raises) puts the old run back, whole, and leaves no archive behind."""
    import yaml

    proj, env = copy
    (proj / "needs_answer.py").write_text("def score(completions, answer, **kwargs):\n"
                                          "    return [float(c == a) for c, a in zip(completions, answer)]\n")
    (proj / "judge_down.py").write_text("def score(completions, **kwargs):\n"
                                        "    raise ValueError('the judge is down')\n")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    change(params)
    (proj / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = files_of(proj)
    proc = run([PY, "-m", "flows.train", "--params", "bad.yaml"], proj, env, check=False)
    one_line_error(proc, named)
    # refused before any model or the engine loads (`check_inputs`), not after; the judge fails in round 1
    loading = "loading what stays warm" in proc.stdout + proc.stderr
    assert loading == (named == "reward `judge`"), (proc.stdout + proc.stderr)[-3000:]
    assert files_of(proj) == before and not (proj / "data" / "archive").exists()
    outputs = [(proj / f).read_bytes() for f in ("metrics/train.json", "plots/train.csv")]
    out = run([PY, "-m", "flows.train"], proj, env)  # the old params: the same run, still complete
    assert f"all {ROUNDS} rounds already complete" in out.stdout + out.stderr
    # nothing to train: no model loads and no output rewritten (DVC would see a change and re-run what follows)
    assert "nothing loaded or written" in out.stdout + out.stderr and "warm resources ready" not in out.stdout + out.stderr
    assert [(proj / f).read_bytes() for f in ("metrics/train.json", "plots/train.csv")] == outputs


def test_a_new_run_killed_outright_in_round_1_is_undone_at_the_next_start(copy):
    """kill -9 (no handler runs) in round 1 of a changed configuration, after the old run moved aside: the next start
    moves it back from the archive (the move's marker says it is pending) and, with the old params, the old run is
    complete as before; no archive is left."""
    import yaml

    proj, env = copy
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["update"]["learning_rate"] *= 2  # another run identity
    (proj / "new.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = files_of(proj)
    flow = subprocess.Popen([PY, "-m", "flows.train", "--params", "new.yaml"], cwd=proj,
                            env={**env, "SLOW_REWARD_CALL": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    new_round = proj / "data" / "rounds" / "round=0000"
    try:  # held in round 1's scoring: the old run in data/archive (with the move's marker), the new round 1 half done
        deadline = time.time() + 300
        while not (list(proj.glob("data/archive/*/.pending-restore.json")) and (new_round / "samples.parquet").exists()
                   and not (new_round / "manifest.json").exists()):
            assert flow.poll() is None and time.time() < deadline, flow.stderr.read()[-3000:]
            time.sleep(0.3)
    finally:
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
    out = run([PY, "-m", "flows.train"], proj, env)  # the old params
    log = out.stdout + out.stderr
    assert "the previous run is back in place" in log and f"all {ROUNDS} rounds already complete" in log, log[-3000:]
    assert files_of(proj) == before and not (proj / "data" / "archive").exists()


def test_a_new_run_killed_after_its_first_round_leaves_the_old_one_archived_for_good(copy):
    """kill -9 in round 2 of a changed configuration: round 1 is complete, so the move's marker is already gone and
    the new run is the run. With its outputs deleted by hand, the next start (old params) does not bring the
    archived run back: it starts afresh, and the old run stays in the archive, whole."""
    import yaml

    proj, env = copy
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["update"]["learning_rate"] *= 2
    (proj / "new.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = files_of(proj)
    flow = subprocess.Popen([PY, "-m", "flows.train", "--params", "new.yaml"], cwd=proj,
                            env={**env, "SLOW_REWARD_CALL": "2"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    rounds = proj / "data" / "rounds"
    try:  # held in round 2's scoring, round 1 complete (the old run's rounds moved aside first)
        deadline = time.time() + 300
        while not (list(proj.glob("data/archive/*/rounds")) and (rounds / "round=0000" / "manifest.json").exists()
                   and (rounds / "round=0001" / "samples.parquet").exists()):
            assert flow.poll() is None and time.time() < deadline, flow.stderr.read()[-3000:]
            time.sleep(0.3)
    finally:
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
    (archive,) = (proj / "data" / "archive").iterdir()
    assert not (archive / ".pending-restore.json").exists()
    for d in ("data/rounds", "models/policy", "models/trainer_state"):  # "start over", by hand
        shutil.rmtree(proj / d)
    out = run([PY, "-m", "flows.train"], proj, env)  # the old params
    log = out.stdout + out.stderr
    assert "back in place" not in log and "resuming" not in log, log[-3000:]
    assert (rounds / f"round={ROUNDS - 1:04d}" / "manifest.json").is_file()  # a fresh run of the old params
    kept = {k.replace("data/rounds/", "", 1): v for k, v in before.items() if k.startswith("data/rounds/")}
    assert {str(p.relative_to(archive / "rounds")): p.read_bytes()
            for p in sorted((archive / "rounds").rglob("*")) if p.is_file()} == kept


def test_rounds_must_be_positive_and_not_below_the_completed_ones(copy):
    proj, env = copy
    one_line_error(run([PY, "-m", "flows.train", "--rounds", "-1"], proj, env, check=False), "--rounds: must be >= 1")
    before = (proj / "metrics" / "train.json").read_bytes()
    one_line_error(run([PY, "-m", "flows.train", "--rounds", "1"], proj, env, check=False),
                   f"--rounds: 1 rounds asked, but {ROUNDS} rounds of this run are already complete")
    assert (proj / "metrics" / "train.json").read_bytes() == before
    shutil.copy(proj / "params.yaml", proj / "mine.yaml")  # the same run from another params file: its advice names it
    one_line_error(run([PY, "-m", "flows.train", "--params", "mine.yaml", "--rounds", "1"], proj, env, check=False),
                   "or start over: python -m flows.train --restart --params mine.yaml")
