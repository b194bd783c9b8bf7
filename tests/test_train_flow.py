"""The training flow (flows/train.py) in the fast suite: a tiny project trained for one round, then resumed for a
second. The resumed round must start from the first round's carried baseline (`ema`), which is checked against the
rounds' own scores, not against another run. A bf16 engine: the update's own forward gives the KL its policy
logprobs. The transformers sampler keeps it fast; vLLM, the SIGKILL resume and `dvc repro` are covered by the slow
tests (tests/test_resume.py, tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from project import PY, make_project, run, run_env

ALPHA = 0.5


def test_a_resumed_run_carries_the_baseline_into_its_next_round(tmp_path, tiny_model_dir):
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.eval_every": 0,
                                                     "advantage.estimator": "ema", "advantage.alpha": ALPHA,
                                                     "sample.backend": "hf", "sample.dtype": "bfloat16"})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    run([PY, "-m", "flows.train"], proj, env)
    out = run([PY, "-m", "flows.train", "--rounds", "2"], proj, env)
    assert "resuming after round 1 of 2" in out.stdout + out.stderr
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(["1"])  # the project's experiment
    assert len(runs) == 1 and runs[0].data.params["train.rounds"] == "1"  # (a run's params do not change)
    assert runs[0].data.tags["latest.train.rounds"] == "2"  # `--rounds 2`, not params.yaml's 1

    rounds = proj / "data" / "rounds"
    means = [pl.read_parquet(rounds / f"round={r:04d}" / "scores.parquet")["rlhf_reward"].mean() for r in (0, 1)]
    state = json.loads((rounds / "round=0001" / "manifest.json").read_text())["advantage_state"]
    assert state["round_means"] == pytest.approx(means, abs=1e-6)  # both rounds: the state came through the resume
    assert state["ema"] == pytest.approx(ALPHA * means[0] + (1 - ALPHA) * means[1], abs=1e-6)
    # the second round's advantages used that baseline: reward - ema after round 2's update of it
    adv = pl.read_parquet(rounds / "round=0001" / "advantages.parquet")
    assert adv["baseline"].to_list() == pytest.approx([state["ema"]] * adv.height, abs=1e-6)
    # a bf16 engine's logprobs are not the policy's: the run resolved to taking them from the update's own forward
    # (one micro-batch here; that the forward is then run once a round is counted in tests/test_warm.py); round 2's
    # KL is a real one (the policy moved)
    manifests = [json.loads((rounds / f"round={r:04d}" / "manifest.json").read_text()) for r in (0, 1)]
    assert [m["policy_logprobs"] for m in manifests] == ["update", "update"]
    kl = pl.read_parquet(rounds / "round=0001" / "scores.parquet")["kl"]
    assert kl.abs().max() > 0
    # the engine gets each update's weights at its next use, and the round that makes the push times it: none in a
    # fresh run's first round; the resumed run's weights as its first round samples
    assert [m["metrics"]["time/weight_sync_s"] > 0 for m in manifests] == [False, True]


def test_an_evaluating_round_pushes_its_update_before_its_evaluation_and_times_it(tmp_path, tiny_model_dir):
    """Also: in one process, round to round, the carried baseline (ema) goes on from the round before."""
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 2, "train.eval_every": 1, "sample.backend": "hf",
                                                     "advantage.estimator": "ema", "advantage.alpha": ALPHA})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    run([PY, "-m", "flows.train"], proj, env)
    rounds = proj / "data" / "rounds"
    manifests = [json.loads((rounds / f"round={r:04d}" / "manifest.json").read_text()) for r in range(2)]
    means = [pl.read_parquet(rounds / f"round={r:04d}" / "scores.parquet")["rlhf_reward"].mean() for r in (0, 1)]
    assert manifests[1]["advantage_state"]["round_means"] == pytest.approx(means, abs=1e-6)
    metrics = [m["metrics"] for m in manifests]
    assert all("eval/reward" in m for m in metrics)
    # a fresh run's first round samples from the weights the engine started with, so the push it reports is its own
    # update's, made for its evaluation; so is the second's (its sampling had the weights the evaluation pushed)
    assert all(m["time/weight_sync_s"] > 0 for m in metrics)


def test_eval_every_n_rounds_evaluates_after_the_nth(tmp_path, tiny_model_dir):
    """train.eval_every: 2 evaluates after the second round, not after the first."""
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 2, "train.eval_every": 2, "sample.backend": "hf"})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    run([PY, "-m", "flows.train"], proj, env)
    rounds = proj / "data" / "rounds"
    metrics = [json.loads((rounds / f"round={r:04d}" / "manifest.json").read_text())["metrics"] for r in range(2)]
    assert ["eval/reward" in m for m in metrics] == [False, True]


def test_mlflow_gets_a_round_once_its_manifest_is_on_disk(tmp_path, tiny_model_dir):
    """A round is complete when its manifest is on disk, and only then does MLflow get its metrics: a round whose
    write failed (or that was killed before it) is re-done at the next start, and MLflow would hold it twice. Here
    the second round's checkpoint cannot be written (its state dir's parent is a file): MLflow has the first round
    only, the run FAILED; with the state dir free, the next start re-does round 2 and MLflow has each step once."""
    import mlflow

    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 2, "train.eval_every": 0, "sample.backend": "hf",
                                                     "update.save_every": 2, "train.state_dir": "blocked/state"})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    (proj / "blocked").write_text("a file where the state dir's parent would be")
    failed = run([PY, "-m", "flows.train"], proj, env, check=False)
    assert failed.returncode != 0 and not (proj / "data" / "rounds" / "round=0001" / "manifest.json").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (first,) = client.search_runs(["1"])
    assert first.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "reward")] == [1]
    (proj / "blocked").unlink()
    run([PY, "-m", "flows.train"], proj, env)
    (again,) = client.search_runs(["1"])  # the same MLflow run, resumed
    assert again.info.run_id == first.info.run_id
    assert sorted(m.step for m in client.get_metric_history(again.info.run_id, "reward")) == [1, 2]


_PIPELINE_LIKE = """
import subprocess, sys, time
from stages.loop.lock import run_lock
with run_lock("scheduled pipeline"):
    out = open("train.log", "w")
    child = subprocess.Popen([sys.executable, "-m", "flows.train", "--rounds", "6"], stdout=out, stderr=out)
    open("train.pid", "w").write(str(child.pid))
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_training_stage_stops_when_the_pipeline_that_passed_it_the_lock_is_killed(tmp_path, tiny_model_dir):
    """A scheduled pipeline holds the run lock and passes it down to its training stage. Killed with kill -9, it lets
    the lock go while the stage goes on; the stage stops at its next round, with one line saying why, instead of
    writing beside the next run. The rounds it completed are kept and a run afterwards resumes after them."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 6, "train.eval_every": 0, "sample.backend": "hf"})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    holder = subprocess.Popen([PY, "-c", _PIPELINE_LIKE], cwd=proj, env=env)
    rounds = proj / "data" / "rounds"
    try:
        deadline = time.monotonic() + 600
        while not (rounds / "round=0000" / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (rounds / "round=0000" / "manifest.json").exists()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        pid = int((proj / "train.pid").read_text())
        while time.monotonic() < deadline:  # gone, or a zombie that no init reaps (a container's)
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.2)
    finally:
        holder.kill()
    log = (proj / "train.log").read_text()
    assert "error: .rloo/run.lock: the process that passed this run the checkout's run lock has ended" in log
    done = sorted(p.parent.name for p in rounds.glob("round=*/manifest.json"))
    assert 1 <= len(done) < 6
    out = run([PY, "-m", "flows.train", "--rounds", str(len(done) + 1)], proj, env)
    assert f"resuming after round {len(done)} of {len(done) + 1}" in out.stdout + out.stderr


def test_a_deployment_run_of_another_configuration_in_params_yaml_s_dirs_is_refused(tmp_path, monkeypatch):
    """`train-now` (or a served flow) with another params file or overrides, in params.yaml's output dirs, would move
    the scheduled pipeline's run to the archive (and the next nightly would start its own over from round 0): a
    deployment's run is refused in one line naming the shared dirs (and while params.yaml does not load). The same
    configuration or other output dirs go on, and a run at a terminal is not checked."""
    import yaml
    from conftest import repo_params_data

    import flows.train as train
    from stages.errors import PipelineError
    from stages.params import load_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params_data()))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(repo_params_data(sample={"k": 3})))
    (tmp_path / "apart.yaml").write_text(yaml.safe_dump(repo_params_data(
        sample={"k": 3}, train={"rounds_dir": "b/rounds", "checkpoint_dir": "b/policy", "state_dir": "b/state"})))
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(repo_params_data(train={"rounds": 99})))  # not identity

    def check(path, overrides=None):
        train.check_not_params_yaml_s_outputs(path, overrides, load_params(path, overrides))

    with pytest.raises(PipelineError) as exc:
        check("other.yaml")
    assert str(exc.value) == (
        "params_path: other.yaml is another configuration than params.yaml's in the same output dirs "
        "(train.rounds_dir, train.checkpoint_dir, train.state_dir): its run would move params.yaml's run (the one "
        "`dvc repro` and the scheduled pipeline continue) to the archive; give it its own train.rounds_dir, "
        "train.checkpoint_dir, train.state_dir, or edit params.yaml itself to change the configuration of the "
        "scheduled runs")
    with pytest.raises(PipelineError, match=r"^params_path: params.yaml with overrides is another configuration"):
        check("params.yaml", {"sample.k": 3})
    for ok in ("apart.yaml", "same.yaml", "params.yaml"):
        check(ok)
    # params.yaml itself, no overrides: the same configuration by construction, not read a second time
    loaded = load_params("params.yaml")
    with monkeypatch.context() as m:
        m.setattr(train, "load_params", lambda *a, **k: pytest.fail(f"params.yaml read again: {a}"))
        train.check_not_params_yaml_s_outputs("params.yaml", None, loaded)
        train.check_not_params_yaml_s_outputs(str(tmp_path / "params.yaml"), {}, loaded)
    # relative output dirs against absolute ones: the same dirs
    (tmp_path / "absolute.yaml").write_text(yaml.safe_dump(repo_params_data(
        sample={"k": 3}, train={"rounds_dir": str(tmp_path / "data" / "rounds")})))
    with pytest.raises(PipelineError, match=r"in the same output dirs \(train.rounds_dir, train.checkpoint_dir"):
        check("absolute.yaml")
    # params.yaml mid-edit (does not load): its dirs are unknown, so the run is refused, not let through
    good = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(good.replace("sample:", "sample: [", 1))
    with pytest.raises(PipelineError, match=r"^params.yaml: does not load \(.*\), so whether apart.yaml would train in "
                                            r"its output dirs cannot be told; fix params.yaml first$"):
        check("apart.yaml")
    (tmp_path / "params.yaml").unlink()  # none at all: nothing to protect
    check("other.yaml")
    (tmp_path / "params.yaml").write_text(good)
    # the flow: only a deployment's run is checked (Prefect's runtime override stands in for one)
    from stages.loop.lock import in_deployment

    assert not in_deployment()  # a run at a terminal (`python -m flows.train --params other.yaml`) is not
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "3f2a6c1e-0000-4000-8000-000000000000")
    with pytest.raises(PipelineError, match=r"^params_path: other.yaml is another configuration"):
        train.train_flow.fn(params_path="other.yaml")


def test_completions_no_reward_applies_to_train_with_advantage_0_outside_the_baselines(tmp_path, tiny_model_dir):
    """A user's reward that returns None where it does not apply, through the flow: a first round where it applies
    to no completion (it stopped the run, at that round on every rerun) trains on at advantage 0; in the next, the
    rows it skipped are unscored (null score and rlhf_reward, counted in the round's metrics), advantage 0, and the
    others' leave-one-out baselines are over their scored siblings alone (TRL 1.16)."""
    proj = make_project(tmp_path, tiny_model_dir, **{
        "train.rounds": 2, "train.eval_every": 0, "sample.backend": "hf",
        "score.rewards": [{"name": "some", "function": "some_reward:f"}]})
    (proj / "some_reward.py").write_text(
        "def f(prompts, completions, trainer_state, **kw):\n"
        "    if trainer_state.global_step == 0:\n"
        "        return [None] * len(completions)\n"
        "    return [None if i % 3 == 0 else float(len(c) % 7) for i, c in enumerate(completions)]\n")
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    out = run([PY, "-m", "flows.train"], proj, env)
    assert "every completion is unscored (no reward applied to any): advantage 0 for all" in out.stdout + out.stderr
    rounds = proj / "data" / "rounds"
    first = pl.read_parquet(rounds / "round=0000" / "advantages.parquet")
    assert first["advantage"].to_list() == [0.0] * first.height and first["rlhf_reward"].null_count() == first.height
    rnd = rounds / "round=0001"
    scores = pl.read_parquet(rnd / "scores.parquet")
    adv = pl.read_parquet(rnd / "advantages.parquet").join(scores.select("prompt_id", "sample_idx", "score"),
                                                           on=["prompt_id", "sample_idx"])
    unscored = adv.filter(pl.col("score").is_null())
    assert unscored.height == scores["score"].null_count() > 0 and scores["rlhf_reward"].null_count() == unscored.height
    assert unscored["advantage"].to_list() == [0.0] * unscored.height and unscored["baseline"].null_count() == unscored.height
    for (pid,), g in adv.filter(pl.col("score").is_not_null()).group_by(["prompt_id"]):
        r = g["rlhf_reward"].to_list()
        want = [x - (sum(r) - x) / (len(r) - 1) if len(r) > 1 else 0.0 for x in r]  # over scored siblings only
        assert g["advantage"].to_list() == pytest.approx(want, abs=1e-9), pid
    manifests = [json.loads((rounds / f"round={r:04d}" / "manifest.json").read_text()) for r in (0, 1)]
    assert [m["metrics"]["score/unscored"] for m in manifests] == [first.height, unscored.height]
    assert manifests[1]["metrics"]["reward"] == pytest.approx(scores["score"].drop_nulls().mean(), abs=1e-9)
    assert manifests[1]["advantage_state"]["round_counts"] == [scores.height - unscored.height]  # round 1 added none
