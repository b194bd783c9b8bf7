"""Resume, end to end on a tiny project: a run killed with SIGKILL mid-round resumes after its last complete round and
ends where an uninterrupted run ends (same prompts, completions and carried baseline); a changed configuration moves
the old run aside and starts clean.

The kill lands at a known point: a reward function of the project (`slow_reward.py`, weight 0) sleeps on its N-th
call when `SLOW_REWARD_CALL=N` is set, so the run is inside round N's scoring when it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import polars as pl
import pytest
import yaml
from project import PY, make_project, run, run_env

pytestmark = pytest.mark.slow
ROUNDS = 3
SLOW_REWARD = '''import os, time
_calls = 0


def score(prompts, completions, **kwargs):
    """0 for every completion; sleeps on call number SLOW_REWARD_CALL (to kill a run at a known point)."""
    global _calls
    _calls += 1
    if os.environ.get("SLOW_REWARD_CALL") == str(_calls):
        time.sleep(600)
    return [0.0] * len(completions)
'''


def _wait_for(path, proc, timeout=600):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def _reference_run(proj, env, *, run_it: bool = True, **update) -> None:
    """The same run, uninterrupted, into other directories (outputs are not part of the run identity), `ref.yaml`."""
    ref_params = yaml.safe_load((proj / "params.yaml").read_text())
    ref_params["train"].update(rounds_dir="data/ref_rounds", checkpoint_dir="models/ref_policy",
                               state_dir="models/ref_state")
    ref_params["update"].update(update)
    (proj / "ref.yaml").write_text(yaml.safe_dump(ref_params))
    if run_it:
        run([PY, "-m", "flows.train", "--params", "ref.yaml"], proj, env)


def _kill_inside(proj, env, reward_call: int, *wait_for, params: str = "params.yaml") -> None:
    """`python -m flows.train` SIGKILLed inside the scoring of the round whose reward call number `reward_call`
    sleeps, once `wait_for` paths exist. Its own process group, so the kill also takes whatever it started, as a
    killed job would lose them."""
    proc = subprocess.Popen([PY, "-m", "flows.train", "--params", params], cwd=proj, env={**env, "SLOW_REWARD_CALL": str(reward_call)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for path in wait_for:
            _wait_for(path, proc)
        time.sleep(1.0)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def slow_project(tmp_path, model_dir, **overrides):
    proj = make_project(tmp_path, model_dir, **{"train.rounds": ROUNDS, "train.eval_every": 0, **overrides})
    (proj / "slow_reward.py").write_text(SLOW_REWARD)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"].append({"name": "slow", "function": "slow_reward:score", "weight": 0.0})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def test_sigkill_mid_round_resumes_to_the_uninterrupted_run(tmp_path, tiny_model_dir):
    proj = slow_project(tmp_path, tiny_model_dir, **{"advantage.estimator": "ema"})  # ema: the carried baseline state matters
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)

    _reference_run(proj, env)
    # Interrupted run: SIGKILL inside round 2's scoring (the reward's 2nd call sleeps).
    rounds = proj / "data" / "rounds"
    _kill_inside(proj, env, 2, rounds / "round=0001" / "samples.parquet")
    assert (rounds / "round=0000" / "manifest.json").is_file()  # round 1 is complete (its write had 1 s)
    assert not (rounds / "round=0001" / "manifest.json").exists()  # round 2 is not

    out = run([PY, "-m", "flows.train"], proj, env)
    assert "resuming after round 1" in out.stdout + out.stderr
    got = sorted(d.name for d in rounds.glob("round=*"))
    assert got == [f"round={r:04d}" for r in range(ROUNDS)]
    for r in range(ROUNDS):
        a = pl.read_parquet(rounds / f"round={r:04d}" / "samples.parquet")
        b = pl.read_parquet(proj / "data" / "ref_rounds" / f"round={r:04d}" / "samples.parquet")
        assert a["prompt_id"].to_list() == b["prompt_id"].to_list()
        assert a["completion_token_ids"].to_list() == b["completion_token_ids"].to_list(), f"round {r} differs"
        m = json.loads((rounds / f"round={r:04d}" / "manifest.json").read_text())
        m_ref = json.loads((proj / "data" / "ref_rounds" / f"round={r:04d}" / "manifest.json").read_text())
        assert m["advantage_state"]["ema"] == pytest.approx(m_ref["advantage_state"]["ema"], abs=1e-6)
        assert m["advantage_state"]["round_means"] == pytest.approx(m_ref["advantage_state"]["round_means"], abs=1e-6)
    assert not list((proj / "models").glob(".policy.tmp-*"))


def test_changed_configuration_moves_the_old_run_aside_and_restore_brings_it_back(tmp_path, tiny_model_dir):
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.eval_every": 0})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    run([PY, "-m", "flows.train"], proj, env)
    old = pl.read_parquet(proj / "data" / "rounds" / "round=0000" / "samples.parquet")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    old_estimator, params["advantage"]["estimator"] = params["advantage"]["estimator"], "batch_mean"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = run([PY, "-m", "flows.train"], proj, env)
    assert "configuration changed" in out.stdout + out.stderr
    advs = pl.read_parquet(proj / "data" / "rounds" / "round=0000" / "advantages.parquet")
    assert advs["estimator"].unique().to_list() == ["batch_mean"]
    (archived,) = (proj / "data" / "archive").iterdir()  # the old run is kept, whole
    kept = pl.read_parquet(archived / "rounds" / "round=0000" / "samples.parquet")
    assert kept.equals(old)
    assert (archived / "policy" / "checkpoint.json").is_file() and list((archived / "state").glob("state-*.pt"))
    assert not (archived / ".pending-restore.json").exists()  # the new run completed: the archive is for good
    # back to the first configuration: `python -m stages.restore` swaps its run back in, and it continues
    params["advantage"]["estimator"] = old_estimator
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = run([PY, "-m", "stages.restore", str(archived.relative_to(proj))], proj, env)
    assert "(1 complete rounds); the run that was there is in data/archive/" in out.stdout
    out = run([PY, "-m", "flows.train", "--rounds", "2"], proj, env)
    assert "configuration changed" not in out.stdout + out.stderr  # resumed, not started over
    assert pl.read_parquet(proj / "data" / "rounds" / "round=0000" / "samples.parquet").equals(old)
    m = json.loads((proj / "data" / "rounds" / "round=0001" / "manifest.json").read_text())
    assert m["round"] == 1 and m["identity"] == json.loads(
        (proj / "data" / "rounds" / "round=0000" / "manifest.json").read_text())["identity"]
    (aside,) = (proj / "data" / "archive").iterdir()  # the batch_mean run, whole
    assert pl.read_parquet(aside / "rounds" / "round=0000" / "advantages.parquet")["estimator"].unique().to_list() == [
        "batch_mean"]


def test_rounds_after_an_older_checkpoint_are_replayed_to_the_uninterrupted_run(tmp_path, tiny_model_dir):
    """`update.save_every: 2`, killed inside round 4: the checkpoint is at round 2 and round 3 is complete. The
    resume replays round 3's update from its artifacts (no sampling or scoring) and runs round 4, which samples
    the uninterrupted run's completions (the replayed policy is the same), and ends with the same weights. The
    resume also raises the run to 5 rounds under a decaying learning rate: round 3 is replayed at the rate it ran
    at (the 4-round schedule's), then rounds 4-5 decay over 5 rounds, as in the reference, whose checkpoint is at
    round 3 when it is killed and raised the same way (before, the replay took the 5-round schedule's rate and the
    weights parted)."""
    from safetensors.torch import load_file

    proj = slow_project(tmp_path, tiny_model_dir, **{"train.rounds": 4, "update.save_every": 2,
                                                     "advantage.estimator": "ema", "update.lr_scheduler": "linear"})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    _reference_run(proj, env, save_every=1, run_it=False)
    ref_rounds = proj / "data" / "ref_rounds"
    _kill_inside(proj, env, 4, ref_rounds / "round=0003" / "samples.parquet", ref_rounds / "round=0002" / "manifest.json",
                 params="ref.yaml")
    assert json.loads((proj / "models" / "ref_policy" / "checkpoint.json").read_text())["round"] == 3
    run([PY, "-m", "flows.train", "--params", "ref.yaml", "--rounds", "5"], proj, env)
    rounds = proj / "data" / "rounds"
    _kill_inside(proj, env, 4, rounds / "round=0003" / "samples.parquet", rounds / "round=0002" / "manifest.json")
    assert json.loads((proj / "models" / "policy" / "checkpoint.json").read_text())["round"] == 2
    assert not json.loads((rounds / "round=0002" / "manifest.json").read_text())["checkpoint"]
    round3 = (rounds / "round=0002" / "samples.parquet").read_bytes()

    out = run([PY, "-m", "flows.train", "--rounds", "5"], proj, env)
    log = out.stdout + out.stderr
    assert "replayed the update of round 3 from its artifacts (the checkpoint was at round 2)" in log, log[-3000:]
    assert "resuming after round 3 of 5" in log
    assert "round 4/5: reward " in log and ", grad norm " in log
    assert "done: 5 rounds (2 trained now); rounds in data/rounds, the policy in models/policy, metrics in " \
           "metrics/train.json and plots/train.csv; MLflow run " in log
    assert (rounds / "round=0002" / "samples.parquet").read_bytes() == round3  # replayed, not re-sampled
    lrs = [json.loads((rounds / f"round={r:04d}" / "manifest.json").read_text())["metrics"]["learning_rate"]
           for r in range(5)]
    assert lrs == [json.loads((ref_rounds / f"round={r:04d}" / "manifest.json").read_text())["metrics"][
        "learning_rate"] for r in range(5)] and lrs[2] > lrs[3] > lrs[4] > 0
    for r in range(5):
        a = pl.read_parquet(rounds / f"round={r:04d}" / "samples.parquet")
        b = pl.read_parquet(proj / "data" / "ref_rounds" / f"round={r:04d}" / "samples.parquet")
        assert a["completion_token_ids"].to_list() == b["completion_token_ids"].to_list(), f"round {r + 1} differs"
    got = load_file(proj / "models" / "policy" / "model.safetensors")
    ref = load_file(proj / "models" / "ref_policy" / "model.safetensors")
    assert got.keys() == ref.keys()
    worst = max((got[k] - ref[k]).abs().max().item() for k in got)
    assert worst == 0.0, f"the replayed run's weights differ from the uninterrupted run's by up to {worst}"
    assert json.loads((proj / "models" / "policy" / "checkpoint.json").read_text())["round"] == 5


def test_a_missing_optimizer_state_is_rebuilt_from_the_base_and_the_rounds(tmp_path, tiny_model_dir):
    """The optimizer state never enters DVC's cache: a clone that pulled a run (or a cleaned state dir) has the
    checkpoint and every round but not the state. The next start replays every round's update from the base model
    (instead of refusing the run), checks the replay against the checkpoint's weights, and goes on as the
    uninterrupted run does: the same next round, the same weights."""
    from safetensors.torch import load_file

    proj = slow_project(tmp_path, tiny_model_dir, **{"train.rounds": 3, "update.save_every": 1})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    _reference_run(proj, env)
    run([PY, "-m", "flows.train", "--rounds", "2"], proj, env)
    for f in (proj / "models" / "trainer_state").iterdir():
        f.unlink()
    out = run([PY, "-m", "flows.train"], proj, env)
    log = out.stdout + out.stderr
    assert "the optimizer state of the checkpoint at round 2 is not in models/trainer_state" in log, log[-3000:]
    assert "rebuilding it: the updates of rounds 1-2 are replayed from the base model and their artifacts" in log
    assert "the replayed policy at round 2 differs from the checkpoint's weights by at most 0.00e+00; the " \
           "checkpoint's weights are kept" in log
    assert "replayed the updates of rounds 1-2 from their artifacts (from the base model) and saved the checkpoint " \
           "at round 2" in log
    rounds, ref_rounds = proj / "data" / "rounds", proj / "data" / "ref_rounds"
    a = pl.read_parquet(rounds / "round=0002" / "samples.parquet")["completion_token_ids"].to_list()
    assert a == pl.read_parquet(ref_rounds / "round=0002" / "samples.parquet")["completion_token_ids"].to_list()
    got = load_file(proj / "models" / "policy" / "model.safetensors")
    ref = load_file(proj / "models" / "ref_policy" / "model.safetensors")
    assert max((got[k] - ref[k]).abs().max().item() for k in got) == 0.0
    assert len(list((proj / "models" / "trainer_state").glob("state-*.pt"))) == 1
    # all rounds complete, the state gone again: nothing to train, so nothing is replayed, loaded or written
    before = (proj / "models" / "policy" / "checkpoint.json").read_bytes()
    for f in (proj / "models" / "trainer_state").iterdir():
        f.unlink()
    out = run([PY, "-m", "flows.train"], proj, env)
    log = out.stdout + out.stderr
    assert "replayed" not in log and "nothing loaded or written" in log, log[-3000:]
    assert (proj / "models" / "policy" / "checkpoint.json").read_bytes() == before
