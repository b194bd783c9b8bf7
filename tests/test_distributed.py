"""One training run over several processes (torchrun, gloo, 2 CPU ranks, the tiny model), docs/design.md §8:

- one round split over 2 ranks equals the same round in one process: the same completions (per-prompt seeds), the same
  advantages for every estimator (and with whitening), the policy after the update equal within 1e-5 (relative), for
  DDP and for FSDP;
- the flow with `train.nproc_per_node: 2` writes the artifacts one process writes (rows, schema), one MLflow run, one
  Prefect flow run, and records the topology; a kill -9 of one rank stops the run within a bounded time, one line names
  the rank, and the next invocation resumes after the last complete round (with one process, too);
- bad input that one rank meets mid-round, and Ctrl-C, are one line each (exit codes 2 and 130), not one per rank.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from project import PROMPTS, PY, make_project, run, run_env, tiny_params
from test_resume import SLOW_REWARD

from stages.estimators import ESTIMATORS
from stages.params import load_params
from stages.runtime import find_malloc, micro_batch_size, sampler_dtype, score_dtype, update_autocast

REPO = Path(__file__).resolve().parents[1]
BIN = Path(PY).parent


def _round_dir(tmp: Path, model_dir: Path, strategy: str = "ddp", held_out: int = 4, **score) -> Path:
    from stages.prepare import prompts_frame, split_prompts

    p = tiny_params(model_dir, tmp)
    # fp32 scoring passes unless a test asks otherwise: on a bf16-native CPU `score.dtype: auto` runs the reference
    # pass in bf16 autocast, whose numbers differ from the fp32 sampler's that round 1 uses in its place by ~3e-3 nats
    # on the tiny model (this test failed on a Zen 5 EPYC with AVX512-BF16, not on AVX2-only hosts)
    p["score"].update({"dtype": "float32"} | score)
    p["base"]["model_dir"] = str(model_dir)
    p["sample"].update(backend="hf", dtype="float32")
    p["train"]["prompts_per_round"] = 5  # an odd count: the ranks get 3 and 2 prompts
    p["update"].update(bf16_autocast=False, strategy=strategy)
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))
    train, held_out = split_prompts(PROMPTS, held_out, 42)
    (tmp / "data" / "prepared").mkdir(parents=True)
    prompts_frame(train, None).write_parquet(tmp / "data" / "prepared" / "train.parquet")
    prompts_frame(held_out, None).write_parquet(tmp / "data" / "prepared" / "eval.parquet")
    return tmp


def _run_round(cwd: Path, out: str, nproc: int, evaluate: bool = False) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "DIST_ROUND_EVAL": "1" if evaluate else ""}
    script = str(REPO / "tests" / "dist_round.py")
    cmd = [PY, script] if nproc == 1 else [PY, "-m", "torch.distributed.run", "--standalone",
                                            f"--nproc_per_node={nproc}", script]
    proc = subprocess.run([*cmd, out, "params.yaml"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return cwd / out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    d = _round_dir(tmp_path_factory.mktemp("single"), tiny_model_dir)
    return _run_round(d, "out", 1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_round_over_two_ranks_equals_one_process(one_process, tmp_path, tiny_model_dir, strategy):
    import torch
    from safetensors.torch import load_file

    two = _run_round(_round_dir(tmp_path, tiny_model_dir, strategy), "out", 2)
    a, b = pl.read_parquet(one_process / "samples.parquet"), pl.read_parquet(two / "samples.parquet")
    assert a["prompt_id"].to_list() == b["prompt_id"].to_list() and a["sample_idx"].to_list() == b["sample_idx"].to_list()
    assert a["completion_token_ids"].to_list() == b["completion_token_ids"].to_list()
    sa, sb = pl.read_parquet(one_process / "scores.parquet"), pl.read_parquet(two / "scores.parquet")
    assert sa.columns == sb.columns and sa.height == sb.height == 15
    assert (sa["rlhf_reward"] - sb["rlhf_reward"]).abs().max() < 1e-6
    # a fresh run's policy is its reference on every rank (FSDP: compared on its gathered shards): round 1's KL is 0
    assert (one_process / "policy_is_ref").read_text() == (two / "policy_is_ref").read_text() == "True"
    assert sa["kl"].to_list() == sb["kl"].to_list() == [0.0] * sa.height
    ra, rb = pl.read_parquet(one_process / "ref_scores.parquet"), pl.read_parquet(two / "ref_scores.parquet")
    assert (ra["logp_ref"] - rb["logp_ref"]).abs().max() < 1e-4  # the reference pass itself, over the ranks
    assert (ra["logp_ref"] - sa["logp_ref"]).abs().max() < 1e-3  # and what round 1 skipped: the same numbers
    names = sorted(p.stem for p in one_process.glob("adv_*.parquet"))
    assert len(names) == 2 * len(ESTIMATORS)  # every estimator, with and without whitening
    for name in names:
        x, y = pl.read_parquet(one_process / f"{name}.parquet"), pl.read_parquet(two / f"{name}.parquet")
        assert x.select("prompt_id", "sample_idx").equals(y.select("prompt_id", "sample_idx"))
        assert (x["advantage"] - y["advantage"]).abs().max() < 1e-6, name
        assert (x["baseline"] - y["baseline"]).abs().max() < 1e-6, name
    wa, wb = load_file(one_process / "weights.safetensors"), load_file(two / "weights.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    for k, v in wa.items():
        rel = float((v - wb[k]).norm() / wb[k].norm())
        assert rel < 1e-5, (k, rel)
        assert not torch.equal(v, base[k])  # the update moved every weight (else the check would be empty)
    from stages import checkpoint  # the checkpoint the flow writes, from the gathered state: it resumes to the same

    meta = checkpoint.read_meta(two / "policy")
    state = checkpoint.load_state(two / "state", meta)
    assert meta["round"] == 1 and len(state["optimizer"]["state"]) == len(wa)  # one AdamW entry per weight
    saved = load_file(two / "policy" / "model.safetensors")
    assert all(float((saved[k] - wb[k]).abs().max()) == 0.0 for k in saved)


def test_fsdp_policy_passes_with_uneven_ranks_finish(tmp_path, tiny_model_dir):
    """Every forward of an FSDP policy is a collective. With a bf16 engine (the default on GPUs) the policy's scoring
    pass always runs: over 9 and 6 completions in batches of 2 it is 5 and 3 forwards, the held-out evaluation's
    over 3 and 2 prompts 2 and 1, and with two epochs the update's pass of the "old" logprobs 5 and 3 micro-batches:
    the rank with fewer must pad, or both wait until the collective times out. Its numbers are one process's."""
    def setup(d):
        d.mkdir()
        _round_dir(d, tiny_model_dir, "fsdp", held_out=5, batch_size=2)
        p = yaml.safe_load((d / "params.yaml").read_text())
        p["sample"]["dtype"] = "bfloat16"  # not the policy's own logprobs: the trainer's pass runs, in score and eval
        p["update"].update(num_ppo_epochs=2, micro_batch_size=2)  # and the update's "old" logprobs: 5 and 3 forwards
        (d / "params.yaml").write_text(yaml.safe_dump(p))
        return d
    one = _run_round(setup(tmp_path / "one"), "out", 1, evaluate=True)
    two = _run_round(setup(tmp_path / "two"), "out", 2, evaluate=True)
    def rows(d):
        key = ["prompt_id", "sample_idx"]
        t = pl.read_parquet(d / "ref_scores.parquet").join(pl.read_parquet(d / "samples.parquet"), on=key)
        return {(r["prompt_id"], r["sample_idx"]): (tuple(r["completion_token_ids"]), r["logp_policy"])
                for r in t.iter_rows(named=True)}
    a, b = rows(one), rows(two)
    assert len(a) == len(b) == 15 and a.keys() == b.keys()
    # the completions a bf16 engine samples may round differently in another batch; where they are the same, the
    # FSDP trainer's logprobs of them are one process's
    same = [k for k in a if a[k][0] == b[k][0]]
    assert len(same) >= 8
    assert max(abs(a[k][1] - b[k][1]) for k in same) < 1e-4
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert ea["prompts"] == eb["prompts"] == 5 and math.isfinite(eb["kl"])


def test_padding_batches_run_the_forwards_of_real_ones(tiny_model_dir):
    """`sequence_logprobs(min_batches=)`: a rank with fewer rows (or none) runs as many model forwards as a real batch
    would: two with shared prompts (the prompt, then the completions), one without."""
    import torch

    from stages.logprobs import PromptCache, sequence_logprobs
    from stages.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for share, per_batch in ((True, 2), (False, 1)):
        calls.clear()
        sequence_logprobs(model, [[5, 6]] * 3, [[7, 8]] * 3, 0, 2, share=share)
        assert len(calls) == 2 * per_batch  # 3 rows in batches of 2
        calls.clear()
        sums, _ = sequence_logprobs(model, [], [], 0, 2, share=share, min_batches=3)
        assert sums == [] and len(calls) == 3 * per_batch
    with pytest.raises(ValueError, match="prompt_cache"):
        sequence_logprobs(model, [[5]], [[7]], 0, 2, min_batches=2, prompt_cache=PromptCache(model, [[5]], 0, 2))
    assert torch.is_grad_enabled()


# ---------------------------------------------------------------- the flow over two ranks

def _flow_project(tmp_path, tiny_model_dir, **overrides):
    proj = make_project(tmp_path, tiny_model_dir, **{"sample.backend": "hf", "train.eval_every": 1,
                                                     "train.prompts_per_round": 5, **overrides})
    (proj / "slow_reward.py").write_text(SLOW_REWARD.replace('os.environ.get("SLOW_REWARD_CALL")',
                                                             'os.environ.get("SLOW_REWARD_CALL" if os.environ.get("RANK", "0") == os.environ.get("SLOW_REWARD_RANK", "0") else "_")'))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"].append({"name": "slow", "function": "slow_reward:score", "weight": 0.0})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = run_env(tmp_path)
    run([PY, "-m", "stages.prepare"], proj, env)
    return proj, env


def _flow_runs(prefect_home: Path) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [r[0] for r in db.execute("select fr.name from flow_run fr join flow f on fr.flow_id = f.id "
                                         "where f.name = 'rloo-train'")]


@pytest.mark.slow
def test_the_flow_over_two_ranks_writes_one_runs_artifacts_and_resumes_after_a_rank_dies(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from stages.io import read_table
    from stages.schemas import ADVANTAGES, SAMPLES, SCORES

    proj, env = _flow_project(tmp_path, tiny_model_dir, **{"train.rounds": 2, "train.nproc_per_node": 2})
    # one process, into other dirs: the reference for rows and schema
    ref = yaml.safe_load((proj / "params.yaml").read_text())
    ref["train"].update(nproc_per_node=1, rounds_dir="data/ref_rounds", checkpoint_dir="models/ref_policy",
                        state_dir="models/ref_state")
    ref["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/ref_mlflow.db"
    (proj / "ref.yaml").write_text(yaml.safe_dump(ref))
    run([PY, "-m", "flows.train", "--params", "ref.yaml"], proj, env)
    runs_before = len(_flow_runs(tmp_path / ".prefect"))

    out = run([PY, "-m", "flows.train"], proj, env)  # train.nproc_per_node: 2 -> torchrun, 2 ranks
    assert "train.nproc_per_node=2: " in out.stdout + out.stderr and "torch.distributed.run" in out.stderr
    for r in range(2):
        d, rd = proj / "data" / "rounds" / f"round={r:04d}", proj / "data" / "ref_rounds" / f"round={r:04d}"
        for name, schema in (("samples", SAMPLES), ("scores", SCORES), ("advantages", ADVANTAGES)):
            a, b = read_table(d / f"{name}.parquet", schema), read_table(rd / f"{name}.parquet", schema)
            assert a.schema == b.schema and a.height == b.height == 15, name
        a, b = pl.read_parquet(d / "samples.parquet"), pl.read_parquet(rd / "samples.parquet")
        assert a["prompt_id"].to_list() == b["prompt_id"].to_list()
        if r == 0:  # the same policy samples the same completions
            assert a["completion_token_ids"].to_list() == b["completion_token_ids"].to_list()
        m = json.loads((d / "manifest.json").read_text())
        assert m["world_size"] == 2 and m["backend"] == "gloo" and m["strategy"] == "ddp"
        assert "eval/win_rate" in m["metrics"] and m["metrics"]["eval/prompts"] == 4
    assert len(_flow_runs(tmp_path / ".prefect")) == runs_before + 1  # one Prefect flow run, not one per rank
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rloo-pipeline").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    found = find_malloc("auto")  # the command preloaded tcmalloc where installed, and the ranks inherited it
    assert runs[0].data.tags["malloc"] == (Path(found).resolve().name if found else "glibc")
    assert runs[0].data.tags["score_dtype"] == score_dtype("auto")
    params = load_params(proj / "params.yaml")  # `auto`: bf16 on CPUs with AMX (with this score.dtype), else fp32
    assert runs[0].data.tags["sample_dtype"] == sampler_dtype("auto", params.score)
    up = params.update  # and what `update.micro_batch_size: auto` resolved to
    resolved = micro_batch_size(up.micro_batch_size, update_autocast(up.bf16_autocast))
    assert runs[0].data.tags["micro_batch_size"] == str(resolved)
    # over two ranks the update's forward never gives the KL its policy logprobs: the engine's, or a trainer pass
    exact = sampler_dtype("auto", params.score) == "float32"
    assert runs[0].data.tags["policy_logprobs"] == ("sampler" if exact else "trainer")
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "reward")) == [1, 2]

    # Round 3: rank 1 sleeps in its scoring and is killed; the run stops, torchrun says which rank died.
    import psutil

    proc = subprocess.Popen([PY, "-m", "flows.train", "--rounds", "3"], cwd=proj, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**env, "SLOW_REWARD_CALL": "2", "SLOW_REWARD_RANK": "1"})
    try:
        rank1 = None
        deadline = time.time() + 300
        while rank1 is None or not (proj / "data" / "rounds" / "round=0002" / "samples.parquet").exists():
            assert proc.poll() is None and time.time() < deadline
            for c in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if c.environ().get("RANK") == "1" and "flows.train" in " ".join(c.cmdline()):
                        rank1 = c
                except psutil.Error:
                    pass
            time.sleep(0.5)
        time.sleep(2)
        t0 = time.time()
        rank1.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=180)
        assert time.time() - t0 < 120, "the surviving rank did not stop in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "error: rank 1 (local_rank: 1, pid " in output and "was killed by SIGKILL" in output, output[-3000:]
    assert not (proj / "data" / "rounds" / "round=0002" / "manifest.json").exists()

    # The next invocation resumes after round 2, here with one process (another world size).
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["nproc_per_node"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    resumed = run([PY, "-m", "flows.train", "--rounds", "3"], proj, env)
    assert "resuming after round 2" in resumed.stdout + resumed.stderr
    m = json.loads((proj / "data" / "rounds" / "round=0002" / "manifest.json").read_text())
    assert m["world_size"] == 1 and m["rows"]["samples"] == 15


@pytest.mark.slow
def test_vllm_engine_per_rank(tmp_path, tiny_model_dir):
    """Each rank runs its own vLLM engine in its process (external_launcher, as TRL's colocate mode)."""
    proj, env = _flow_project(tmp_path, tiny_model_dir, **{"sample.backend": "vllm", "train.rounds": 1,
                                                           "train.nproc_per_node": 2, "train.eval_every": 0})
    run([PY, "-m", "flows.train"], proj, env)
    m = json.loads((proj / "data" / "rounds" / "round=0000" / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["rows"]["samples"] == 15
    s = pl.read_parquet(proj / "data" / "rounds" / "round=0000" / "samples.parquet")
    assert s["prompt_id"].n_unique() == 5 and s.group_by("prompt_id").len()["len"].to_list() == [3] * 5


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_more_processes_than_gpus_are_refused_where_the_ranks_would_use_cuda(monkeypatch, device):
    """One rank per GPU: where the ranks would run on CUDA (`cuda`, or `auto` where torch sees a GPU), more processes
    than GPUs are refused by the launcher's check; on CPUs any number runs (GPUs stubbed: none here)."""
    import torch

    from conftest import repo_params
    from stages.errors import PipelineError
    from stages.update import check_ranks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    params = repo_params(base={"device": device})
    check_ranks(params, 1)
    if device == "cpu":
        check_ranks(params, 2)
        return
    with pytest.raises(PipelineError, match=r"^train.nproc_per_node: 2 processes, one per GPU, but torch sees 1 GPU"):
        check_ranks(params, 2)
    check_ranks(params, 2, per_node=False)  # a rank's trainer: the world may span nodes


def test_a_bad_setting_with_several_ranks_is_one_line_before_torchrun(tmp_path, tiny_model_dir):
    """What every rank would refuse is checked once, before torchrun starts them: one `error:` line and exit code 2,
    not one line per rank followed by torchrun's traceback."""
    proj, env = _flow_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.nproc_per_node": 2})
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"][0]["function"] = "no_such_module:score"
    (proj / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([PY, "-m", "flows.train", "--params", "bad.yaml"], proj, env, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("error: ") == 1 and "cannot import module `no_such_module`" in out.stderr
    assert "torch.distributed.run" not in out.stderr  # refused before the ranks start
    # what the ranks' trainers refuse, and the device, are said here too (each rank took minutes to load before)
    import torch

    bad = {"update.grad_variance: measured in one process only": ("update", "grad_variance", True),
           "update.strategy: fsdp with update.use_lora is not supported": ("update", "use_lora", True)}
    if not torch.cuda.is_available():
        bad["base.device: cuda requested but torch sees no GPU"] = ("base", "device", "cuda")
    for said, (section, field, value) in bad.items():
        one = yaml.safe_load((proj / "params.yaml").read_text())
        one[section][field] = value
        if field == "use_lora":
            one["update"]["strategy"] = "fsdp"
        (proj / "bad.yaml").write_text(yaml.safe_dump(one, sort_keys=False))
        out = run([PY, "-m", "flows.train", "--params", "bad.yaml"], proj, env, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stderr.count("error: ") == 1 and said in out.stderr, out.stderr[-3000:]
        assert "torch.distributed.run" not in out.stderr
    # the deployment's override of train.nproc_per_node: anything but a whole number >= 1 is one line
    for value in ("abc", "0", "-1", "2.5", "\u00b2"):
        out = run([PY, "-m", "flows.train"], proj, {**env, "RLOO_NPROC_PER_NODE": value}, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert f"error: RLOO_NPROC_PER_NODE: must be a whole number >= 1 (got '{value}')" in out.stderr


RANK_ONE_FAILS = '''import os


def score(prompts, completions, **kwargs):
    """0 for every completion; rank 1 raises on its first call (a reward service down for one process)."""
    if os.environ.get("RANK") == "1":
        raise ValueError("the judge is down")
    return [0.0] * len(completions)
'''


def test_bad_input_that_one_rank_meets_at_run_time_is_one_line(tmp_path, tiny_model_dir):
    """Bad input that only a round meets (here a reward that raises, on rank 1 only) is told once by the launcher:
    one `error:` line naming the reward, exit code 2, no rank's traceback and none of torchrun's."""
    proj, env = _flow_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.nproc_per_node": 2,
                                                           "train.eval_every": 0})
    (proj / "rank_one_fails.py").write_text(RANK_ONE_FAILS)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"].append({"name": "judge", "function": "rank_one_fails:score", "weight": 1.0})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([PY, "-m", "flows.train"], proj, env, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("error: ") == 1 and "raised ValueError: the judge is down" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: reward `judge`")
    assert not (proj / "data" / "rounds" / "round=0000" / "manifest.json").exists()


RANK_ONE_HANGS = '''import os
import time


def score(prompts, completions, **kwargs):
    """0 for every completion; rank 1 hangs on its first call (a reward service that never answers one process)."""
    if os.environ.get("RANK") == "1":
        time.sleep(600)
    return [0.0] * len(completions)
'''


@pytest.mark.slow
def test_a_rank_that_never_comes_to_a_collective_is_named(tmp_path, tiny_model_dir):
    """Rank 1 hangs in a reward: rank 0 waits train.dist_timeout_s in the next collective and gives up. The line
    names the rank that never came and the setting, not rank 0 "exited with code 1" as the failure, and the step is
    not tried again (a retry would wait for the same peer)."""
    proj, env = _flow_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.nproc_per_node": 2,
                                                           "train.eval_every": 0, "train.dist_timeout_s": 60})
    # (60 s: with 10, a loaded machine once had rank 1 give up on rank 0, still opening the MLflow store at start:
    # the line then named rank 0 as the late one, rightly)
    (proj / "rank_one_hangs.py").write_text(RANK_ONE_HANGS)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"].append({"name": "judge", "function": "rank_one_hangs:score", "weight": 1.0})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.monotonic()
    out = run([PY, "-m", "flows.train"], proj, env, check=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1, out.stderr[-3000:]
    assert last.startswith("error: rank 0 waited train.dist_timeout_s for the other ranks in a collective and gave up "
                           "(") and "Timed out waiting" in last, out.stderr[-3000:]
    assert "; rank 1 never came to it (busy or hung in a step of its own" in last
    assert "Retry 1/1" not in out.stderr and time.monotonic() - t0 < 300
    assert not (proj / "data" / "rounds" / "round=0000" / "manifest.json").exists()


@pytest.mark.slow
def test_ctrl_c_with_several_ranks_is_one_line_and_the_run_resumes(tmp_path, tiny_model_dir):
    """Ctrl-C (SIGINT to the foreground process group: the launcher and both ranks) in round 2: one `interrupted:`
    line, exit code 130, round 1 kept; the next invocation resumes after it."""
    proj, env = _flow_project(tmp_path, tiny_model_dir, **{"train.rounds": 2, "train.nproc_per_node": 2,
                                                           "train.eval_every": 0})
    proc = subprocess.Popen([PY, "-m", "flows.train"], cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**env, "SLOW_REWARD_CALL": "2", "SLOW_REWARD_RANK": "1"})
    try:
        deadline = time.time() + 300
        while not (proj / "data" / "rounds" / "round=0001" / "samples.parquet").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # rank 1 sleeps in round 2's scoring, rank 0 waits for it
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.count("interrupted: ") == 1 and err.strip().splitlines()[-1].startswith("interrupted: "), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (proj / "data" / "rounds" / "round=0000" / "manifest.json").exists()
    resumed = run([PY, "-m", "flows.train"], proj, env)
    assert "resuming after round 1" in resumed.stdout + resumed.stderr
    assert (proj / "data" / "rounds" / "round=0001" / "manifest.json").exists()


def test_a_rank_s_echo_of_another_rank_s_failure_in_the_sql_pool_is_not_logged(tmp_path, monkeypatch):
    """The launcher's SIGTERM (another rank failed) landing inside MLflow's sqlite store made its pool log "Error
    closing cursor" with a three-part traceback beside the one `error:` line; once another rank has reported, the
    pool's error records are dropped, and kept otherwise."""
    import logging

    from conftest import LogRecords

    from flows.train import SQL_POOL_LOGGER
    from stages.errors import RANK_REPORTS_ENV, quiet_bad_input_tracebacks

    monkeypatch.setenv(RANK_REPORTS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    quiet_bad_input_tracebacks(SQL_POOL_LOGGER)
    seen = LogRecords()
    with seen.on(SQL_POOL_LOGGER):
        logging.getLogger(SQL_POOL_LOGGER).error("Error closing cursor (alone)")
        (tmp_path / "rank-1.json").write_text('{"kind": "error", "message": "reward `r1` gave NaN"}')
        logging.getLogger(SQL_POOL_LOGGER).error("Error closing cursor (after rank 1)")
    assert seen.lines == ["Error closing cursor (alone)"]


def test_the_launcher_names_the_ranks_that_waited_and_the_one_that_never_came():
    """Ranks that timed out in a collective report it; with one rank left it is the late one, with several the line
    says one of them is (a waiting rank stopped by the launcher before it reported looks the same)."""
    from flows.train import timeout_line

    gloo = "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete"
    assert timeout_line({1: {"kind": "error", "message": "x"}}, 2) is None
    two = timeout_line({0: {"kind": "timeout", "message": gloo}}, 2)
    assert two.startswith(f"error: rank 0 waited train.dist_timeout_s for the other ranks in a collective and gave up "
                          f"({gloo}); rank 1 never came to it (busy or hung")
    eight = timeout_line({r: {"kind": "timeout", "message": gloo} for r in range(8) if r != 5}, 8)
    assert eight.startswith("error: ranks 0, 1, 2, 3, 4, 6, 7 waited") and "; rank 5 never came to it" in eight
    three = timeout_line({0: {"kind": "timeout", "message": gloo}, 1: {"kind": "peer", "message": ""}}, 3)
    assert "; one of ranks 1, 2 never came to it (those that did not report waiting)" in three


def test_only_a_gloo_collective_in_a_process_group_counts_as_timed_out_or_broken(monkeypatch):
    """vLLM's "Timed out waiting for engine core processes to start", an HTTP "Connection reset by peer": not a
    collective; they keep their traceback and their retry. A broken pipe (the pipeline that read this process is
    gone) is not retried either."""
    import types

    from flows.train import _no_retry_on_bad_input
    from stages import errors

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 20000ms for send "
                        "operation to complete")
    closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]")
    other = RuntimeError("Timed out waiting for engine core processes to start")
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert errors.dist_timeout(gloo) is None  # no process group here
    monkeypatch.setattr(errors, "_dist_on", lambda: True)
    assert errors.dist_timeout(gloo) is gloo and errors.dist_timeout(closed) is None
    assert errors.dist_broken(closed) is closed and errors.dist_broken(gloo) is gloo
    assert errors.dist_timeout(other) is None and errors.dist_broken(other) is None and errors.dist_broken(reset) is None

    def state(exc):
        def result():
            raise exc
        return types.SimpleNamespace(result=result)

    retried = {name: _no_retry_on_bad_input(None, None, state(exc)) for name, exc in
               [("gloo", gloo), ("closed", closed), ("other", other), ("reset", reset), ("pipe", BrokenPipeError(32, "x")),
                ("denied", PermissionError(1, "Operation not permitted", "data/rounds/round=0003")),
                ("eperm", PermissionError(1, "Operation not permitted"))]}  # no path: not the setup's (a bug's)
    assert retried == {"gloo": False, "closed": False, "other": True, "reset": True, "pipe": False, "denied": False,
                       "eperm": True}
