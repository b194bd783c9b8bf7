"""End to end: `dvc repro` for real in a temporary git repo (tiny model, 2 rounds), then `dvc exp run -S`."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
import yaml
from project import BIN, make_project, run, run_env

from stages.io import read_table
from stages.schemas import ADVANTAGES, SAMPLES, SCORES

pytestmark = pytest.mark.slow
K, PER_ROUND, ROUNDS = 3, 3, 2


@pytest.fixture(scope="module")
def repro(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("e2e")
    proj = make_project(root, tiny_model_dir)
    (root / "tmp").mkdir()
    env = run_env(root, TMPDIR=str(root / "tmp"))  # what the commands leave in the temp dir is seen
    out = run([str(BIN / "dvc"), "repro"], proj, env)
    return root, proj, env, out


def test_every_round_has_valid_artifacts(repro):
    root, proj, _, out = repro
    # the vLLM engines of train and evaluate, closed, took their torch.distributed rendezvous files with them
    # (vllm_dist_<uuid> in the temp dir; only a killed process leaves its own)
    assert "vllm" in out.stdout + out.stderr and not list((root / "tmp").glob("vllm_dist_*"))
    for stage in ("prepare", "train", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out.stdout
    rounds = sorted((proj / "data" / "rounds").glob("round=*"))
    assert [d.name for d in rounds] == [f"round={r:04d}" for r in range(ROUNDS)]
    for r, d in enumerate(rounds):
        samples = read_table(d / "samples.parquet", SAMPLES)
        scores = read_table(d / "scores.parquet", SCORES)
        advs = read_table(d / "advantages.parquet", ADVANTAGES)
        assert samples.height == scores.height == advs.height == K * PER_ROUND
        assert samples["policy_version"].unique().to_list() == [r]
        assert (samples["num_tokens"] == samples["completion_token_ids"].list.len()).all()
        sums = advs.group_by("prompt_id").agg(s=pl.col("advantage").sum())
        assert sums["s"].abs().max() < 1e-9  # leave-one-out advantages sum to zero per prompt
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["round"] == r and manifest["rows"]["advantages"] == K * PER_ROUND
        assert {"reward", "kl", "loss", "grad_norm", "entropy", "advantage_std"} <= set(manifest["metrics"])
    assert (proj / "models" / "policy" / "model.safetensors").is_file()
    meta = json.loads((proj / "models" / "policy" / "checkpoint.json").read_text())
    assert meta["round"] == ROUNDS and (proj / "models" / "trainer_state" / f"state-{meta['checkpoint_id']}.pt").is_file()


def test_metrics_plots_and_report(repro):
    _, proj, env, _ = repro
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert train["rounds"] == ROUNDS and "reward" in train and "kl" in train
    # the loop's wall time holds the rounds and the wait for the run's last checkpoint, which the file gives apart
    assert 0.0 < train["last_write_wait_s"] < train["rounds_wall_s"] < train["wall_s"]
    assert train["rounds_wall_s"] - train["last_write_wait_s"] >= ROUNDS * train["seconds_per_round"] * 0.99
    ev = json.loads((proj / "metrics" / "eval.json").read_text())
    assert {"reward", "ref_reward", "win_rate", "kl", "mean_length"} <= set(ev)
    assert 0.0 <= ev["win_rate"] <= 1.0 and ev["prompts"] == 4
    csv = (proj / "plots" / "train.csv").read_text().splitlines()
    assert csv[0].startswith("round,reward") and len(csv) == ROUNDS + 1
    html = (proj / "reports" / "report.html").read_text()
    assert "data:image/png;base64," in html
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], proj, env)
    assert "win_rate" in shown.stdout and "reward" in shown.stdout
    # `dvc plots show` draws dvc.yaml's plots, and plots/train.csv only through them (not once more on its own)
    import yaml

    declared = [next(iter(p)) for p in yaml.safe_load((proj / "dvc.yaml").read_text())["plots"]]
    drawn = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], proj, env).stdout)["data"]
    assert sorted(drawn) == sorted(declared) and all(drawn[p] for p in declared), list(drawn)


def test_mlflow_run_has_history_params_and_tags(repro):
    from mlflow.tracking import MlflowClient

    root, _, _, _ = repro
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("rloo-pipeline")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    history = client.get_metric_history(run_.info.run_id, "reward")
    assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1))
    for key in ("kl", "loss", "grad_norm", "entropy", "advantage_std", "completions/mean_length", "time/sample_s"):
        assert client.get_metric_history(run_.info.run_id, key), key
    assert run_.data.params["advantage.estimator"] == "rloo"
    assert run_.data.tags.get("dvc_stage") == "train"
    assert run_.data.tags.get("prefect_flow_run_id")
    arts = [a.path for a in client.list_artifacts(run_.info.run_id, "completions")]
    assert len(arts) == ROUNDS
    # the evaluate stage's held-out numbers, as metrics/eval.json has them, at the step of the policy's round
    _, proj, _, _ = repro
    ev = json.loads((proj / "metrics" / "eval.json").read_text())
    (win,) = client.get_metric_history(run_.info.run_id, "final_eval/win_rate")
    assert win.value == pytest.approx(ev["win_rate"]) and win.step == ev["policy_version"] == ROUNDS
    assert client.get_metric_history(run_.info.run_id, "final_eval/win_rate_ci95_low")
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "final_eval")] == ["final_eval/examples.md"]


def test_exp_run_reruns_only_dependent_stages(repro):
    _, proj, env, _ = repro
    out = run([str(BIN / "dvc"), "exp", "run", "-S", "evaluate.num_examples=1"], proj, env)
    assert "Running stage 'evaluate'" in out.stdout
    assert "Running stage 'train'" not in out.stdout
    assert "Running stage 'prepare'" not in out.stdout
    shown = run([str(BIN / "dvc"), "exp", "show", "--json"], proj, env)
    assert "win_rate" in shown.stdout


def test_queued_estimator_sweep_reports_gradient_variance(repro):
    """The README's sweep recipe: queue estimator variants with the gradient variance on, run them, compare. With the
    default relative MLflow store (sqlite:///mlflow.db), the queued run's MLflow run lands in the checkout's store, not
    in the temporary copy DVC runs it in and deletes."""
    from mlflow import MlflowClient

    _, proj, env, _ = repro
    dvc = str(BIN / "dvc")
    run([dvc, "exp", "run", "--queue", "-n", "grpo-gv", "-S", "advantage.estimator=grpo",
         "-S", "update.grad_variance=true", "-S", "mlflow.tracking_uri=sqlite:///mlflow.db"], proj, env)
    run([dvc, "exp", "run", "--run-all"], proj, env)
    shown = json.loads(run([dvc, "exp", "show", "--json"], proj, env).stdout)
    exps = [e for commit in shown for e in (commit.get("experiments") or [])
            if e.get("name") == "grpo-gv"]
    assert exps, f"experiment grpo-gv not in `dvc exp show`: {json.dumps(shown)[:2000]}"
    data = exps[0]["revs"][0]["data"]
    train = data["metrics"]["metrics/train.json"]["data"]
    assert train["grad_variance_mean"] > 0 and train["grad_snr"] is not None
    assert data["params"]["params.yaml"]["data"]["advantage"]["estimator"] == "grpo"
    assert "win_rate" in data["metrics"]["metrics/eval.json"]["data"]
    got = MlflowClient(tracking_uri=f"sqlite:///{proj}/mlflow.db").get_run(train["mlflow_run_id"])
    assert got.data.params["advantage.estimator"] == "grpo" and got.data.tags["dvc_experiment"] == "grpo-gv"


def test_editing_a_shared_module_marks_its_stages_changed(repro):
    """dvc.yaml's deps cover every imported project file: a comment in stages/io.py re-runs the stages that run it."""
    _, proj, env, _ = repro
    dvc = str(BIN / "dvc")
    io = proj / "stages" / "io.py"
    original = io.read_text()
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}
    try:
        io.write_text(original + "\n# an edit\n")
        changed = set(json.loads(run([dvc, "status", "--json"], proj, env).stdout))
        assert {"prepare", "train", "evaluate", "report"} <= changed, changed
    finally:
        io.write_text(original)
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}


def test_a_failed_prepare_leaves_its_outputs(repro):
    """prepare's outs persist: DVC does not delete the model and the prepared prompts before the stage runs, so a
    prompts file without its column fails with one line and leaves them as they were."""
    _, proj, env, _ = repro
    dvc = str(BIN / "dvc")
    prompts = proj / "data" / "prompts" / "tiny.jsonl"
    kept = [proj / "data" / "prepared" / "train.parquet", proj / "data" / "prepared" / "eval.parquet",
            proj / "models" / "base" / "config.json"]
    before = {p: p.read_bytes() for p in kept}
    original = prompts.read_text()
    try:
        prompts.write_text(original.replace('"prompt"', '"text"'))
        out = run([dvc, "repro", "prepare"], proj, env, check=False)
        assert out.returncode != 0
        assert "no `prompt` column" in out.stdout + out.stderr
        assert {p: p.read_bytes() for p in kept if p.exists()} == before
    finally:
        prompts.write_text(original)
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}


def test_a_changed_prompts_file_does_not_rebuild_the_model(repro):
    """models/base persists across prepare's runs and is written again only when it is not the one prepare recorded
    (files, source, conversion): a new prompt re-runs prepare under `dvc repro` without copying the model again."""
    _, proj, env, _ = repro
    dvc = str(BIN / "dvc")
    prompts = proj / "data" / "prompts" / "tiny.jsonl"
    original = prompts.read_text()
    try:
        prompts.write_text(original + json.dumps({"prompt": "one more prompt to learn from"}) + "\n")
        out = run([dvc, "repro", "prepare"], proj, env)
        assert "Running stage 'prepare'" in out.stdout
        assert "is up to date" in out.stdout + out.stderr and "copying model" not in out.stdout + out.stderr
    finally:
        prompts.write_text(original)
        run([dvc, "repro", "prepare"], proj, env)  # back to the recorded prompts (the same files, so the same hashes)
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}


def test_a_damaged_round_is_restored_by_the_command_its_error_gives(repro):
    """The resume's advice for a damaged artifact is a granular `dvc checkout --force <file>`: run as printed, it
    puts back exactly that file from DVC's cache, and the run then finds every round intact."""
    _, proj, env, _ = repro
    target = proj / "data" / "rounds" / "round=0000" / "advantages.parquet"
    uncached = proj / "data" / "rounds" / "round=0001" / "notes.txt"  # stands for what DVC never cached
    good = target.read_bytes()
    try:
        target.write_bytes(good[:100])
        uncached.write_text("mine")
        out = run([str(BIN / "python"), "-m", "flows.train"], proj, env, check=False)
        assert out.returncode == 2, out.stderr[-2000:]
        fix = re.search(r"restore it with `(dvc checkout [^`]+)`", out.stderr)
        assert fix and "round 1 is damaged" in out.stderr, out.stderr[-2000:]
        assert fix.group(1) == f"dvc checkout --force {target.relative_to(proj)}"
        run([str(BIN / "dvc"), *fix.group(1).split()[1:]], proj, env)
        assert target.read_bytes() == good
        assert uncached.read_text() == "mine"  # `dvc checkout --force data/rounds` would have deleted it
    finally:
        target.write_bytes(good)
        uncached.unlink(missing_ok=True)
    assert json.loads(run([str(BIN / "dvc"), "status", "--json"], proj, env).stdout) == {}


def test_exp_run_with_two_ranks(repro):
    """`dvc exp run -S train.nproc_per_node=2` runs the train stage under torchrun (here: one more round, 2 ranks)."""
    _, proj, env, _ = repro
    dvc = str(BIN / "dvc")
    out = run([dvc, "exp", "run", "-S", "train.nproc_per_node=2", "-S", f"train.rounds={ROUNDS + 1}"], proj, env)
    assert "Running stage 'train'" in out.stdout
    m = json.loads((proj / "data" / "rounds" / f"round={ROUNDS:04d}" / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["rows"]["samples"] == K * PER_ROUND
    assert json.loads((proj / "data" / "rounds" / "round=0000" / "manifest.json").read_text())["world_size"] == 1


def test_the_dvc_cache_holds_the_policy_not_the_optimizer_state(repro):
    """What DVC versions per run is what users need to reproduce and share; the optimizer state stays outside."""
    _, proj, _, _ = repro
    stages = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    outs = [o["path"] for st in stages.values() for o in st.get("outs", [])]
    assert "models/policy" in outs and not [o for o in outs if "trainer_state" in o or "state-" in o], outs
    cached = sorted(f.stat().st_size for f in (proj / ".dvc" / "cache").rglob("*") if f.is_file())
    state = max(f.stat().st_size for f in (proj / "models" / "trainer_state").rglob("*") if f.is_file())
    policy = (proj / "models" / "policy" / "model.safetensors").stat().st_size
    assert state > 1.8 * policy  # AdamW's two moments: the optimizer state is twice the weights
    # the cache holds weights (base, the policy of each run and experiment) and small files, nothing state-sized;
    # how many policies depends on how many experiments the module's tests ran, so count no totals
    assert cached[-1] < 0.9 * state and cached.count(policy) >= 1, (cached[-5:], state)


def test_push_to_a_remote_and_pull_into_another_clone(repro, tmp_path):
    """`dvc push` to a local-directory remote, `git clone` + `dvc pull` elsewhere: `dvc repro` there is up to date
    and the evaluation metrics are the same."""
    _, proj, env, _ = repro
    dvc = str(BIN / "dvc")
    run([dvc, "remote", "add", "-d", "store", str(tmp_path / "remote")], proj, env)
    run(["git", "add", "-A"], proj, env)
    run(["git", "commit", "-qm", "the run, its lock file and metrics"], proj, env)
    run([dvc, "push"], proj, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    run([dvc, "pull"], clone, env)
    status = run([dvc, "status", "--json"], clone, env)
    assert json.loads(status.stdout) == {}, status.stdout
    out = run([dvc, "repro"], clone, env)
    assert "Running stage" not in out.stdout and "up to date" in out.stdout
    assert json.loads((clone / "metrics" / "eval.json").read_text()) == json.loads((proj / "metrics" / "eval.json").read_text())
    assert (clone / "models" / "policy" / "model.safetensors").read_bytes() == (proj / "models" / "policy" / "model.safetensors").read_bytes()
    assert (clone / "reports" / "report.html").is_file() and (clone / "data" / "rounds" / "round=0000" / "manifest.json").is_file()
    # the clone has no optimizer state (never in DVC's cache): one more round rebuilds it from the base model and the
    # pulled rounds (as many as the module's earlier tests left), and continues the run
    assert not (clone / "models" / "trainer_state").exists()
    done = json.loads((clone / "metrics" / "train.json").read_text())["rounds"]
    out = run([dvc, "exp", "run", "-S", f"train.rounds={done + 1}", "-S", "train.nproc_per_node=1"], clone, env)
    log = out.stdout + out.stderr
    assert f"rebuilding it: the updates of rounds 1-{done} are replayed from the base model" in log, log[-3000:]
    gap = re.search(rf"the replayed policy at round {done} differs from the checkpoint's weights by at most (\S+); the "
                    "checkpoint's weights are kept", log)
    assert gap and float(gap.group(1)) <= 1e-4, log[-3000:]  # 0 where every round ran in one process
    assert json.loads((clone / "data" / "rounds" / f"round={done:04d}" / "manifest.json").read_text())["round"] == done
