"""stages.tracking on a real MLflow store (sqlite in tmp_path): params, tags and per-round metrics at step = round;
a resumed training run re-opens the same MLflow run; a failed run is marked FAILED."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from conftest import repo_params
from stages import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _round_tables():
    keys = {"prompt_id": ["a", "a"], "sample_idx": [0, 1]}
    return (pl.DataFrame({**keys, "prompt_text": ["p", "p"], "completion": ["x", "y"], "num_tokens": [1, 2]}),
            pl.DataFrame({**keys, "score": [0.5, 0.25], "score/len": [1.0, 0.5], "kl": [0.0, 0.1]}),
            pl.DataFrame({**keys, "advantage": [0.25, -0.25]}))


def test_steps_params_tags_and_a_resumed_run(store, monkeypatch):
    params = repo_params()
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "11111111-1111-4111-8111-111111111111")  # Prefect's override
    run = tracking.start_run(params, "ident", topology={"world_size": 2, "backend": "gloo", "strategy": None})
    run_id = run.info.run_id
    samples, scores, advs = _round_tables()
    tracking.log_round({"reward": 0.1, "kl": 0.0, "note": "text is skipped"}, step=1, samples=samples, scores=scores,
                       advantages=advs, n=1)
    tracking.log_round({"reward": 0.2}, step=2)
    tracking.finish_run(None, [{"reward": 0.1}, {"reward": 0.2}], failed=True)  # killed: FAILED
    r = store.get_run(run_id)
    assert r.info.status == "FAILED"
    assert [a.path for a in store.list_artifacts(run_id)] == ["completions"]  # no curve for a failed run
    # TRL's completions log: the prompt, the completion, each reward component, the advantage
    logged = json.loads(Path(store.download_artifacts(run_id, "completions/round_0001.json")).read_text())
    assert logged == {"round": 1, "completions": [{"prompt_id": "a", "sample_idx": 0, "prompt_text": "p",
                      "completion": "x", "num_tokens": 1, "score": 0.5, "score/len": 1.0, "kl": 0.0,
                      "advantage": 0.25}]}
    assert r.data.params["update.learning_rate"] == str(params.update.learning_rate)
    assert r.data.tags["identity"] == "ident" and r.data.tags["world_size"] == "2" and "strategy" not in r.data.tags
    assert r.data.tags["prefect_flow_run_id"].startswith("1111")
    assert r.info.run_name == f"{params.advantage.estimator}-ident"  # not "rloo-rloo-..."
    # the resumed training run re-opens the same MLflow run and goes on at the next step; its tags name the latest
    # invocation
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "22222222-2222-4222-8222-222222222222")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    more = repo_params(train={"rounds": params.train.rounds + 5})  # more rounds: the same run
    again = tracking.start_run(more, "ident", resume_id=run_id)
    assert again.info.run_id == run_id
    tags = store.get_run(run_id).data.tags
    assert tags["prefect_flow_run_id"].startswith("2222") and tags["dvc_experiment"] == "exp-1"
    # one process now, not two: no stale world_size; the changed field beside its (immutable) first value
    assert "world_size" not in tags and "backend" not in tags
    assert tags["latest.train.rounds"] == str(params.train.rounds + 5)
    assert store.get_run(run_id).data.params["train.rounds"] == str(params.train.rounds)
    assert not [k for k in tags if k.startswith("latest.") and k != "latest.train.rounds"]
    import mlflow

    mlflow.end_run()  # the invocation ends (finish_run's own end, without its artifacts)
    # another DVC experiment continues it: `dvc_experiment` names the latest, `dvc_experiments` every one, so the run
    # is still found by the experiment that ran it first
    assert tags["dvc_experiments"] == "exp-1"
    monkeypatch.setenv("DVC_EXP_NAME", "exp-2")
    tracking.start_run(more, "ident", resume_id=run_id)
    mlflow.end_run()
    tags = store.get_run(run_id).data.tags
    assert (tags["dvc_experiment"], tags["dvc_experiments"]) == ("exp-2", "exp-1,exp-2")
    assert [r.info.run_id for r in store.search_runs([r.info.experiment_id],
                                                     "tags.dvc_experiments LIKE '%exp-1%'")] == [run_id]
    monkeypatch.delenv("DVC_EXP_NAME")  # not an experiment any more: the tag goes; back to the first value
    tracking.start_run(params, "ident", resume_id=run_id)
    tags = store.get_run(run_id).data.tags
    assert "dvc_experiment" not in tags and tags["latest.train.rounds"] == str(params.train.rounds)
    assert tags["dvc_experiments"] == "exp-1,exp-2"  # the history stays
    tracking.log_round({"reward": 0.3}, step=3)
    tracking.finish_run({"reward": 0.3}, [{"reward": 0.1}, {"reward": 0.2}, {"reward": 0.3}])
    r = store.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert sorted(a.path for a in store.list_artifacts(run_id)) == ["completions", "history.json", "plots"]
    assert [a.path for a in store.list_artifacts(run_id, "plots")] == ["plots/reward_curve.png"]
    hist = sorted((m.step, m.value) for m in store.get_metric_history(run_id, "reward"))
    assert hist == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [a.path for a in store.list_artifacts(run_id, "completions")] == ["completions/round_0001.json"]
    exp = store.get_experiment(r.info.experiment_id)
    assert exp.name == params.mlflow.experiment and len(store.search_runs([exp.experiment_id])) == 1


def test_a_resumed_run_logs_the_complete_rounds_it_lacks_from_their_manifests(store):
    """A run stopped between a round's manifest and its MLflow logging (the flow logs a round once its manifest is on
    disk): the next start logs the rounds the MLflow run lacks, from their manifests, and none twice."""
    run = tracking.start_run(repo_params(), "ident")
    tracking.log_round({"reward": 0.1, "kl": 0.0}, step=1)
    tracking.finish_run(None, [], failed=True)
    manifests = [{"round": r, "metrics": {"reward": 0.1 * (r + 1), "kl": 0.01 * r, "note": "x"}} for r in range(3)]
    tracking.start_run(repo_params(), "ident", resume_id=run.info.run_id)
    assert tracking.log_missing_rounds(manifests) == [2, 3]
    assert tracking.log_missing_rounds(manifests) == []
    tracking.finish_run(None, [])
    history = store.get_metric_history(run.info.run_id, "reward")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [m.step for m in store.get_metric_history(run.info.run_id, "kl")] == [1, 2, 3]


def test_an_unknown_run_id_starts_a_new_run(store):
    run = tracking.start_run(repo_params(), "ident", resume_id="0" * 32)
    assert run.info.run_id != "0" * 32
    tracking.finish_run(None, [])
    assert store.get_run(run.info.run_id).info.status == "FINISHED"


def test_the_store_the_command_opens_ahead_is_the_one_its_run_logs_to(store, tmp_path, monkeypatch):
    """`python -m flows.train` opens the store while its Prefect server boots (`preload_flow_modules`): the database
    and the experiment exist before the flow, and the run's start reuses them; with nothing left to train it opens
    none. A store or experiment that does not open stops the command there, in one line naming the field to fix."""
    from flows.train import preload_flow_modules

    params = repo_params(sample={"backend": "hf"})  # not vLLM's import, which this test does not need
    preload_flow_modules(params, open_store=False)
    assert store.get_experiment_by_name(params.mlflow.experiment) is None
    preload_flow_modules(params)
    exp = store.get_experiment_by_name(params.mlflow.experiment)
    assert exp is not None
    run = tracking.start_run(params, "ident")
    assert run.info.experiment_id == exp.experiment_id
    tracking.finish_run(None, [])
    assert [r.info.run_id for r in store.search_runs([exp.experiment_id])] == [run.info.run_id]
    # a store that cannot open (its directory is a file)
    from stages.errors import PipelineError

    (tmp_path / "a-file").write_text("")
    bad = f"sqlite:///{tmp_path}/a-file/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
    with pytest.raises(PipelineError) as e:
        preload_flow_modules(params)
    msg = str(e.value)
    assert msg.startswith(f"MLFLOW_TRACKING_URI: the MLflow store {bad} did not open (") and "\n" not in msg
    assert msg.endswith("fix the URI or start its tracking server")
    # a tracking server that is not there: one line at once (MLflow's client retried for ~4 minutes first)
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as e:
        preload_flow_modules(params)
    assert time.monotonic() - t0 < 60
    assert str(e.value) == (f"MLFLOW_TRACKING_URI: the MLflow store http://127.0.0.1:{port} did not open (no connection "
                            f"to 127.0.0.1:{port} in 5 s: ConnectionRefusedError: [Errno 111] Connection refused); fix "
                            "the URI or start its tracking server")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # from params.yaml's field: the message names that field
    with pytest.raises(PipelineError, match="^mlflow.tracking_uri: the MLflow store sqlite:///"):
        preload_flow_modules(repo_params(sample={"backend": "hf"}, mlflow={"tracking_uri": bad}))
    # the store opens but its experiment cannot be set (deleted): the message names the experiment, not the URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    store.delete_experiment(exp.experiment_id)
    with pytest.raises(PipelineError) as e:
        preload_flow_modules(params)
    msg = str(e.value)
    assert msg.startswith(f"mlflow.experiment: {params.mlflow.experiment!r} could not be set in the MLflow store ")
    assert msg.endswith("name another experiment, or restore it if it was deleted") and "\n" not in msg
    # set but empty, the variable still wins (as MLflow reads it): the message names it, not params.yaml's field
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking.store_uri(params) == ("MLFLOW_TRACKING_URI", "")


def test_a_queued_dvc_experiment_logs_to_the_checkouts_store(tmp_path, monkeypatch):
    """DVC runs a queued experiment in a copy of the checkout under .dvc/tmp/exps/ and deletes the copy afterwards: a
    relative local store (the default sqlite:///mlflow.db) is the checkout's, or every queued run's MLflow run would
    be deleted with its copy; an absolute or remote one is left as it is, and so is any store outside a queue."""
    from stages.errors import queued_checkout

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    home = (tmp_path / "repo").resolve()

    def uri(value):
        return tracking.store_uri(repo_params(sample={"backend": "hf"}, mlflow={"tracking_uri": value}))[1]

    monkeypatch.chdir(copy)
    assert queued_checkout() == home
    assert uri("sqlite:///mlflow.db") == f"sqlite:///{home}/mlflow.db"
    assert uri("sqlite:///runs/m.db") == f"sqlite:///{home}/runs/m.db"
    assert uri("mlruns") == f"{home}/mlruns" and uri("file:./mlruns") == (home / "mlruns").as_uri()
    for kept in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "/srv/mlruns", "file:///srv/mlruns"):
        assert uri(kept) == kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///m.db")  # the variable too
    assert tracking.store_uri(repo_params()) == ("MLFLOW_TRACKING_URI", f"sqlite:///{home}/m.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # the store opens in the checkout, and the experiment it makes keeps its artifacts there too (MLflow's default,
    # ./mlruns, would be in the copy)
    params = repo_params(sample={"backend": "hf"}, mlflow={"tracking_uri": "sqlite:///mlflow.db", "experiment": "q"})
    tracking.open_store(params)
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").get_experiment_by_name("q")
    assert exp.artifact_location == (home / "mlruns").as_uri() and not (copy / "mlflow.db").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # (open_store set it)
    monkeypatch.chdir(tmp_path / "repo")
    assert queued_checkout() is None and uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_a_run_killed_before_its_first_manifest_is_marked_killed_by_the_next_start(store, tmp_path, monkeypatch):
    """A process killed (-9) before its first round's manifest leaves its MLflow run RUNNING, and no manifest holds its
    id for a resume to re-open: the next start in the same checkout and rounds dir on this machine (which holds the
    run lock) marks it KILLED; a RUNNING run of another dir, machine or checkout, or whose process is alive, is left
    alone, and the new run's name is not the dead one's."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    monkeypatch.chdir(tmp_path)  # the rounds dir (relative in params.yaml) resolves here, in both processes
    code = ("import os, signal; from conftest import repo_params; from stages import tracking; "
            "tracking.start_run(repo_params(), 'ident'); os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    params = repo_params()
    exp = store.get_experiment_by_name(params.mlflow.experiment)
    [dead] = store.search_runs([exp.experiment_id])
    assert dead.info.status == "RUNNING" and dead.data.tags["rounds_dir"] == str(tmp_path / params.train.rounds_dir)
    assert dead.data.tags["checkout"] == (tmp_path / ".rloo" / "checkout-id").read_text()
    from stages.loop.lock import process_key

    # RUNNING runs that are not this dead one's kind: another dir, machine or checkout, or a process still alive
    # (e.g. a rank that outlived the lock's holder)
    elsewhere = [store.create_run(exp.experiment_id, tags={**dead.data.tags, key: value}).info.run_id
                 for key, value in (("rounds_dir", "other"), ("host", "other"), ("checkout", "other"),
                                    ("owner", process_key()))]
    run = tracking.start_run(params, "ident")
    tracking.finish_run(None, [])
    status = {r.info.run_id: r.info.status for r in store.search_runs([exp.experiment_id])}
    assert status == {dead.info.run_id: "KILLED", run.info.run_id: "FINISHED", **dict.fromkeys(elsewhere, "RUNNING")}
    assert "died" in store.get_run(dead.info.run_id).data.tags["ended_as"]
    assert run.info.run_name == f"{dead.info.run_name}-2"
    # the dead run resumed after all (its rounds put back from an archive): it goes on, without the mark
    tracking.start_run(params, "ident", resume_id=dead.info.run_id)
    tracking.finish_run(None, [])
    again = store.get_run(dead.info.run_id)
    assert again.info.status == "FINISHED" and "ended_as" not in again.data.tags
