"""Scheduled runs against a real local Prefect server with a real process worker, on a tiny project: the deployments of
prefect.yaml (cron schedule, concurrency limit 1), and what a run of the whole pipeline does: new prompts in the prompts
file are prepared and trained on, with the held-out metrics as artifacts; a run with nothing new is a quick reported
no-op; `more_rounds` adds rounds; `dvc status` is clean after each run."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
import yaml
from project import BIN, PY, REPO, make_project, run, run_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited: {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("prefect server did not become healthy")


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = run_env(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_deployment(proj, env, *params: str, state: str = "COMPLETED") -> tuple[dict, float]:
    """Start a run of rloo-pipeline/nightly now and let a worker take it; (its flow run, seconds)."""
    prefect = str(BIN / "prefect")
    args = [a for p in params for a in ("--param", p)]
    started = run([prefect, "deployment", "run", "rloo-pipeline/nightly", *args], proj, env)
    flow_run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    t0 = time.time()
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "rloo-process", "--run-once"],
                              cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = worker.communicate(timeout=1200)
    finally:
        if worker.poll() is None:
            worker.kill()
    info = json.loads(run([prefect, "flow-run", "inspect", flow_run_id, "--output", "json"], proj, env).stdout)
    assert info["state"]["type"] == state, out[-6000:]
    return info, time.time() - t0


def artifact(proj, env, key: str) -> dict:
    out = run([str(BIN / "prefect"), "artifact", "inspect", key, "--limit", "1", "--output", "json"], proj, env)
    data = json.loads(out.stdout)
    return data[0] if isinstance(data, list) else data


def scheduled_runs(proj, env) -> int:
    """How many flow runs the server holds in a Scheduled state."""
    listed = run([str(BIN / "prefect"), "flow-run", "ls", "--state-type", "SCHEDULED", "--limit", "5", "--output",
                  "json"], proj, env, check=False)
    try:
        return len(json.loads(listed.stdout or "[]"))
    except json.JSONDecodeError:
        return listed.stdout.count("nightly")


def rounds_of(proj) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((proj / "data" / "rounds").glob("round=*/manifest.json"))]


def test_the_scheduled_pipeline(tmp_path, tiny_model_dir, prefect_server):
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 2, "train.eval_every": 0})
    env = run_env(tmp_path, PREFECT_API_URL=prefect_server)
    prefect, dvc = str(BIN / "prefect"), str(BIN / "dvc")
    run([prefect, "work-pool", "create", "rloo-process", "--type", "process"], proj, env)
    # The cron schedule is deployed inactive here (the repo's prefect.yaml has it active): at 02:00 UTC a worker would
    # take the nightly run as well, which the concurrency limit makes this test's run wait behind (a pause after the
    # deploy keeps a run already due). It is resumed at the end, where the scheduler must create the upcoming runs.
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (nightly,) = [d for d in shipped["deployments"] if d["name"] == "nightly"]
    assert [s.get("active") for s in nightly["schedules"]] == [True]
    text = (proj / "prefect.yaml").read_text()
    assert text.count("        active: true\n") == 1
    (proj / "prefect.yaml").write_text(text.replace("        active: true\n", "        active: false\n"))
    run([prefect, "--no-prompt", "deploy", "--name", "nightly", "--name", "train-now"], proj, env)
    dep = json.loads(run([prefect, "deployment", "inspect", "rloo-pipeline/nightly", "--output", "json"], proj, env).stdout)
    assert dep["concurrency_limit"] == 1 or (dep.get("global_concurrency_limit") or {}).get("limit") == 1
    assert any(s["schedule"].get("cron") == "0 2 * * *" for s in dep["schedules"])
    # the checkout it was deployed from is where the workers run it (no environment variable to forget)
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(proj.resolve())}}]
    (cron,) = [s["id"] for s in dep["schedules"] if s["schedule"].get("cron") == "0 2 * * *"]

    # 1. the first run: every stage, 2 rounds, the held-out metrics as an artifact
    info, _ = run_deployment(proj, env)
    assert [m["round"] for m in rounds_of(proj)] == [0, 1]
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}
    metrics = artifact(proj, env, "rloo-heldout-metrics")
    assert "win_rate" in json.dumps(metrics)

    # 2. new prompts in the prompts file: prepared, and trained on (train.rounds raised, the new ones first)
    added = ["tell me about the music of the film", "the ending was wonderful and the cast was great",
             "write a review of the acting and the story"]
    with open(proj / "data" / "prompts" / "tiny.jsonl", "a") as fh:
        fh.write("".join(json.dumps({"prompt": p}) + "\n" for p in added))
    run_deployment(proj, env)
    from stages.prepare import prompt_id

    new_ids = {prompt_id(p) for p in added}
    train_ids = set(pl.read_parquet(proj / "data" / "prepared" / "train.parquet")["prompt_id"])
    new_in_train = new_ids & train_ids
    assert new_in_train, "the stable split put every added prompt in the held-out set"
    ms = rounds_of(proj)
    assert len(ms) > 2 and yaml.safe_load((proj / "params.yaml").read_text())["train"]["rounds"] == len(ms)
    trained_after = {pid for m in ms[2:] for pid in m["prompt_ids"]}
    assert new_in_train <= trained_after  # every new training prompt was trained on
    assert not new_in_train & {pid for m in ms[:2] for pid in m["prompt_ids"]}
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}
    held_out = set(pl.read_parquet(proj / "data" / "prepared" / "eval.parquet")["prompt_id"])
    assert not held_out & {pid for m in ms for pid in m["prompt_ids"]}  # no trained prompt became a held-out one

    # 3. nothing new: a reported no-op, quickly
    n_rounds = len(ms)
    _, seconds = run_deployment(proj, env)
    assert len(rounds_of(proj)) == n_rounds
    assert "Nothing to do" in json.dumps(artifact(proj, env, "rloo-pipeline-run"))

    # 4. continue for N more rounds
    run_deployment(proj, env, "more_rounds=1")
    assert len(rounds_of(proj)) == n_rounds + 1
    assert json.loads(run([dvc, "status", "--json"], proj, env).stdout) == {}

    # 5. a run that fails (a reward module that does not import; prepare up to date): its artifact says why, the rounds
    # and params stay
    good = (proj / "params.yaml").read_text()
    data = yaml.safe_load(good)
    data["score"]["rewards"] = [{"name": "mine", "function": "no_such_module:reward"}]
    (proj / "params.yaml").write_text(yaml.safe_dump(data))
    bad_text = (proj / "params.yaml").read_text()
    run_deployment(proj, env, "more_rounds=1", state="FAILED")
    assert len(rounds_of(proj)) == n_rounds + 1 and (proj / "params.yaml").read_text() == bad_text
    failed = json.dumps(artifact(proj, env, "rloo-pipeline-run"))
    assert "Failed" in failed and "no_such_module" in failed, failed[:2000]
    assert "stages run before it failed: none" in failed and "params.yaml: put back as the run found it" in failed
    (proj / "params.yaml").write_text(good)

    print(f"no-op run: {seconds:.1f} s")

    # 6. another configuration: the old run is moved to the archive, which the training stage logs in Prefect's console
    # format (it imports Prefect before its logging setup): that line reaches the pipeline run's own log
    data = yaml.safe_load(good)
    data["sample"]["temperature"] = 0.9
    (proj / "params.yaml").write_text(yaml.safe_dump(data))
    info, _ = run_deployment(proj, env)
    logs = run([prefect, "flow-run", "logs", info["id"]], proj, env).stdout
    assert "train: the configuration changed: the previous run (" in logs, logs[-4000:]
    assert len(list((proj / "data" / "archive").iterdir())) == 1
    # its training stage's own flow run carries the pipeline run's tag (a kill -9 of the stage: the pipeline marks
    # that run Crashed, pipeline.crash_stage_runs)
    trains = json.loads(run([prefect, "flow-run", "ls", "--flow-name", "rloo-train", "--limit", "3", "--output", "json"],
                            proj, env).stdout)
    assert any(f"rloo-pipeline:{info['id']}" in t.get("tags", []) for t in trains), trains

    # 7. the schedule resumed: the scheduler creates upcoming cron runs (this is what sqlalchemy 2.1 silently breaks;
    # its loop runs every 60 s)
    run([prefect, "deployment", "schedule", "resume", "rloo-pipeline/nightly", cron], proj, env)
    deadline = time.time() + 180
    while time.time() < deadline and not scheduled_runs(proj, env):
        time.sleep(2)
    assert scheduled_runs(proj, env) > 0


def test_a_pipeline_run_with_nothing_changed_is_a_no_op(tmp_path, tiny_model_dir):
    """The no-op decision itself, without a server: `python -m flows.pipeline` on an up-to-date project runs no stage."""
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.eval_every": 0})
    env = run_env(tmp_path)
    run([str(BIN / "dvc"), "repro"], proj, env)
    t0 = time.time()
    out = run([PY, "-m", "flows.pipeline"], proj, env)
    assert '"noop": true' in out.stdout and time.time() - t0 < 120
    # another params file: dvc.yaml's stages read ./params.yaml, so raising train.rounds there would train from this
    # one; refused in one line, both files untouched
    (proj / "other.yaml").write_text((proj / "params.yaml").read_text())
    before = (proj / "params.yaml").read_bytes()
    bad = run([PY, "-m", "flows.pipeline", "--params", "other.yaml", "--more-rounds", "1"], proj, env, check=False)
    assert bad.returncode == 2 and "params_path: other.yaml is not this project's params.yaml" in bad.stderr, bad.stderr[-2000:]
    assert (proj / "params.yaml").read_bytes() == before == (proj / "other.yaml").read_bytes()


def _prefect_servers(home) -> list[int]:
    """PIDs of processes started with PREFECT_HOME=home that run a Prefect server."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            environ = (p / "environ").read_bytes().split(b"\0")
            cmd = (p / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"PREFECT_HOME={home}".encode() in environ and b"server" in cmd:
            pids.append(int(p.name))
    return pids


def test_serve_without_an_api_gets_a_server_that_dies_with_it(tmp_path):
    """`python -m flows.serve` with no PREFECT_API_URL serves on a temporary server of its own; kill -9 of the
    command leaves no server behind (the kernel stops it with its parent)."""
    home = (tmp_path / ".prefect").resolve()
    env = run_env(tmp_path)
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen([PY, "-m", "flows.serve", "--cron", ""], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, seen = time.time() + 240, ""
        while "being served" not in seen:  # Prefect's "Your flow 'rloo-train' is being served and polling ..."
            line = serve.stdout.readline()
            assert line and time.time() < deadline, seen[-3000:]
            seen += line
        servers = _prefect_servers(home)
        assert servers, "no temporary Prefect server found"
    finally:
        serve.kill()  # SIGKILL: no handler of ours runs
        serve.wait()
    deadline = time.time() + 30
    while _prefect_servers(home) and time.time() < deadline:
        time.sleep(0.5)
    assert not _prefect_servers(home)
