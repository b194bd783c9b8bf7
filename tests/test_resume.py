"""A training run killed with SIGKILL mid-round resumes after its last complete round and ends where an
uninterrupted run ends (same rounds, same prompts, same completions)."""

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


def _wait_for(path, proc, timeout=600):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def test_sigkill_mid_round_resumes(tmp_path, tiny_model_dir):
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": ROUNDS, "train.eval_every": 0})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)

    # Uninterrupted reference run into other directories.
    ref_params = yaml.safe_load((proj / "params.yaml").read_text())
    ref_params["train"].update(rounds_dir="data/ref_rounds", checkpoint_dir="models/ref_policy")
    (proj / "ref.yaml").write_text(yaml.safe_dump(ref_params))
    run([PY, "-m", "flows.train", "--params", "ref.yaml"], proj, env)

    # Interrupted run: SIGKILL once round 2 has written its samples (mid-round: no manifest yet).
    rounds = proj / "data" / "rounds"
    # Its own process group, so the SIGKILL also takes its temporary Prefect API server (as a killed job would).
    proc = subprocess.Popen([PY, "-m", "flows.train"], cwd=proj, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(rounds / "round=0001" / "samples.parquet", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Round 0's checkpoint and manifest are written in the background (train.async_checkpoint) while round 1
    # samples: the kill may come before or after that write ends. Round 1 is mid-round either way.
    assert not (rounds / "round=0001" / "manifest.json").exists()
    round0_done = (rounds / "round=0000" / "manifest.json").is_file()

    out = run([PY, "-m", "flows.train"], proj, env)
    if round0_done:  # (killed between its checkpoint and manifest, the manifest is repaired from the checkpoint)
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
        assert m["advantage_state"]["round_means"] == pytest.approx(m_ref["advantage_state"]["round_means"], abs=1e-6)


def test_changed_configuration_starts_clean(tmp_path, tiny_model_dir):
    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.eval_every": 0})
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    run([PY, "-m", "flows.train"], proj, env)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["advantage"]["estimator"] = "batch_mean"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = run([PY, "-m", "flows.train"], proj, env)
    assert "configuration changed" in out.stdout + out.stderr
    advs = pl.read_parquet(proj / "data" / "rounds" / "round=0000" / "advantages.parquet")
    assert advs["estimator"].unique().to_list() == ["batch_mean"]
