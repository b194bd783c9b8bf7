"""The training flow deployed from prefect.yaml to a real local Prefect server, run by a real worker."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest
from project import BIN, PY, make_project, run, run_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc, timeout=120):
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


def test_deploy_schedule_and_run_from_prefect_yaml(tmp_path, tiny_model_dir, prefect_server):
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.eval_every": 0})
    env = run_env(tmp_path, PREFECT_API_URL=prefect_server, RLOO_PIPELINE_DIR=str(proj))
    prefect = str(BIN / "prefect")
    run([PY, "-m", "stages.prepare"], proj, env)
    run([prefect, "work-pool", "create", "rloo-process", "--type", "process"], proj, env)
    run([prefect, "--no-prompt", "deploy", "--all"], proj, env)


    inspect = run([prefect, "deployment", "inspect", "rloo-train/nightly", "--output", "json"], proj, env)
    dep = json.loads(inspect.stdout)
    assert dep["concurrency_limit"] == 1 or (dep.get("global_concurrency_limit") or {}).get("limit") == 1
    assert any(s["schedule"].get("cron") == "0 2 * * *" for s in dep["schedules"])

    started = run([prefect, "deployment", "run", "rloo-train/nightly"], proj, env)
    flow_run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "rloo-process", "--run-once"],
        cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = worker.communicate(timeout=900)
    finally:
        if worker.poll() is None:
            worker.kill()
    state = run([prefect, "flow-run", "inspect", flow_run_id, "--output", "json"], proj, env)
    info = json.loads(state.stdout)
    assert info["state"]["type"] == "COMPLETED", out[-4000:]
    manifest = json.loads((proj / "data" / "rounds" / "round=0000" / "manifest.json").read_text())
    assert manifest["round"] == 0 and manifest["rows"]["samples"] > 0

    # The scheduler created upcoming cron runs (this is what sqlalchemy 2.1 silently breaks).
    deadline = time.time() + 60
    scheduled = 0
    while time.time() < deadline and not scheduled:
        listed = run([prefect, "flow-run", "ls", "--state-type", "SCHEDULED", "--limit", "5", "--output", "json"], proj, env, check=False)
        try:
            scheduled = len(json.loads(listed.stdout or "[]"))
        except json.JSONDecodeError:
            scheduled = listed.stdout.count("nightly")
        if not scheduled:
            time.sleep(2)
    assert scheduled > 0
