"""The RLOO training flow: rounds of sample -> score -> advantage -> update (-> evaluate), warm.

Steps of one round (each a Prefect task, all in this one process):
1. sample     K completions per prompt from the running vLLM engine  -> round=NNNN/samples.parquet
2. score      rewards + logprobs under policy and reference, KL      -> round=NNNN/scores.parquet
3. advantage  leave-one-out (or the configured estimator) baseline    -> round=NNNN/advantages.parquet
4. update     REINFORCE step(s); new weights pushed into the engine (no restart, ~0.3 s)
5. checkpoint every `update.save_every` rounds and at the end; then the round's manifest.json; both in a
   background thread (`train.async_checkpoint`) that overlaps the next round's sampling and scoring and that
   the next update waits for (see RoundWriter)
(6. evaluate  every `train.eval_every` rounds, on held-out prompts, with the same warm engine)

Kept warm for the whole run (DESIGN.md §3): the vLLM engine, the policy with its optimizer, the reference
model and the reward models. A round never starts vLLM or reloads a model from disk.

Resume: a round is complete when its `manifest.json` exists; the manifest records the configuration hash.
A re-run continues after the last complete round of the same configuration, from the checkpoint written
with it (optimizer, scheduler, RNG and baseline state included); a changed configuration starts clean and
says so. A crash between checkpoint and manifest is repaired from the copy of the manifest inside the
checkpoint. With `update.save_every > 1`, rounds after the last checkpoint are re-done.

Run: `python -m flows.train [--params params.yaml] [--rounds N]` (what the DVC stage `train` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.runtime import configure_env

configure_env()
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

import polars as pl  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from stages.errors import PipelineError, run_cli  # noqa: E402
from stages.params import Params, load_params  # noqa: E402

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
CONFIG_SECTIONS = ("base", "prepare", "sample", "score", "advantage", "update")


# ---------------------------------------------------------------- pure helpers


def config_hash(params: Params) -> str:
    """What makes two runs the same training run: everything but the round count, eval and logging."""
    import hashlib

    data = params.model_dump(mode="json")
    ident = {s: data[s] for s in CONFIG_SECTIONS}
    ident["train"] = {k: v for k, v in data["train"].items() if k not in ("rounds", "eval_every", "async_checkpoint")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def round_dir(rounds_dir: Path, r: int) -> Path:
    return Path(rounds_dir) / f"round={r:04d}"


def round_prompts(train: pl.DataFrame, r: int, per_round: int, seed: int) -> pl.DataFrame:
    """Prompts of round r: consecutive slices of a per-epoch seeded shuffle (no repeats within an epoch)."""
    n = train.height
    take = min(per_round, n)
    out = []
    start = r * take
    while len(out) < take:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + take - len(out)])
    return train[out]


def completed_rounds(rounds_dir: Path, chash: str) -> tuple[list[dict], bool]:
    """Manifests of consecutive complete rounds 0..R-1 with this config hash; and whether other configs exist."""
    manifests: list[dict] = []
    other = False
    for d in sorted(Path(rounds_dir).glob("round=*")):
        m = d / MANIFEST
        if not m.is_file():
            continue
        data = json.loads(m.read_text())
        if data.get("config_hash") != chash:
            other = True
            continue
        manifests.append(data)
    manifests.sort(key=lambda m: m["round"])
    consecutive = []
    for i, m in enumerate(manifests):
        if m["round"] != i:
            break
        consecutive.append(m)
    return consecutive, other


# ---------------------------------------------------------------- warm resources


@dataclass
class Warm:
    """Everything loaded once per run."""

    params: Params
    device: Any
    sampler: Any
    trainer: Any
    ref: Any
    rewards: list
    tokenizer: Any
    train_prompts: pl.DataFrame
    eval_prompts: pl.DataFrame | None
    adv_state: dict | None = None
    ref_eval: tuple | None = None  # (ref_samples, ref_scores), fixed for the run
    timings: dict = field(default_factory=dict)


def load_warm(params: Params, total: int, resume_from: Path | None = None, with_eval: bool = False) -> Warm:
    """Load everything a run keeps warm: trainer (+optimizer), reference, rewards, and the sampler engine
    (started once; it gets the trainer's weights when resuming). `with_eval` also generates the reference
    policy's held-out completions once, for per-round evaluation."""
    from stages.io import read_table
    from stages.models import load_causal_lm, load_tokenizer
    from stages.rewards import build_rewards
    from stages.runtime import setup_torch
    from stages.sample import make_sampler
    from stages.schemas import PROMPTS
    from stages.update import load_trainer

    device = setup_torch(params.base.device, params.base.threads, params.base.seed)
    tokenizer = load_tokenizer(params.base.model_dir, "base.model_dir")
    train_prompts = read_table("data/prepared/train.parquet", PROMPTS)
    eval_prompts = read_table("data/prepared/eval.parquet", PROMPTS) if with_eval else None
    trainer, _ = load_trainer(params, device, resume_from, total_rounds=total)
    ref_dir = params.score.ref_model or params.base.model_dir
    ref = load_causal_lm(ref_dir, "float32", device, "score.ref_model").eval()
    rewards = build_rewards(params.score.rewards, device=device, batch_size=params.score.batch_size)
    sampler = make_sampler(str(ref_dir), params)
    w = Warm(params, device, sampler, trainer, ref, rewards, tokenizer, train_prompts, eval_prompts)
    if with_eval:
        from stages.evaluate import generate_one, task_scores

        ref_samples = generate_one(sampler, tokenizer, eval_prompts, params, params.base.seed, 0)
        w.ref_eval = (ref_samples, task_scores(ref_samples, rewards, eval_prompts))
    if resume_from is not None:
        sampler.update_weights(state_dict=trainer.state_dict_for_sampler())
    return w


def _no_retry_on_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return True


# ---------------------------------------------------------------- tasks


# Plain functions (no I/O): the tasks below add the Parquet artifact; benchmarks call them bare.


def sample_round(w: Warm, r: int, prompts: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    from stages.sample import GenerationConfig, sample_prompts

    sp = w.params.sample
    cfg = GenerationConfig(sp.k, sp.max_completion_length, sp.temperature, sp.top_p, list(sp.stop))
    return sample_prompts(w.sampler, w.tokenizer, prompts, cfg, w.params.base.seed, r, r, sp.max_model_len)


def score_round(w: Warm, samples: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    from stages.score import score_samples

    logp_policy = None
    if w.params.score.policy_logprobs == "sampler" or (
        w.params.score.policy_logprobs == "auto" and getattr(w.sampler, "exact_logprobs", False)
    ):
        # fp32 sampler: its raw logprobs are the policy's own (measured: 1.6e-4 max abs per sequence)
        logp_policy = [float(sum(x)) for x in samples["sampler_logprobs"]]
    return score_samples(samples, w.rewards, w.trainer.model, w.ref, w.tokenizer, w.params.score, w.train_prompts, logp_policy)


def advantage_round(w: Warm, scores: pl.DataFrame, source: str = "scores") -> tuple[pl.DataFrame, dict, dict]:
    from stages.advantage import compute_advantages

    return compute_advantages(scores, w.params.advantage, w.adv_state, source=source)


def update_round(w: Warm, samples: pl.DataFrame, advantages: pl.DataFrame) -> dict:
    """One policy update, then the new weights pushed into the running sampler (no restart, no disk)."""
    from stages.update import training_batch

    stats = w.trainer.step(training_batch(samples, advantages))
    t0 = time.perf_counter()
    w.sampler.update_weights(state_dict=w.trainer.state_dict_for_sampler())
    stats["time/weight_sync_s"] = time.perf_counter() - t0
    return stats


@task(name="sample", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=_no_retry_on_bad_input)
def sample_task(w: Warm, r: int, prompts: pl.DataFrame, out: Path) -> tuple[pl.DataFrame, dict]:
    from stages.io import write_table
    from stages.schemas import SAMPLES

    df, stats = sample_round(w, r, prompts)
    write_table(df, out, SAMPLES)
    return df, stats


@task(name="score", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_no_retry_on_bad_input)
def score_task(w: Warm, samples: pl.DataFrame, out: Path) -> tuple[pl.DataFrame, dict]:
    from stages.io import write_table
    from stages.schemas import SCORES

    df, stats = score_round(w, samples)
    write_table(df, out, SCORES)
    return df, stats


@task(name="advantage", cache_policy=NO_CACHE, persist_result=False)
def advantage_task(w: Warm, scores: pl.DataFrame, out: Path) -> tuple[pl.DataFrame, dict, dict]:
    from stages.io import write_table
    from stages.schemas import ADVANTAGES

    df, state, stats = advantage_round(w, scores, str(out.parent / "scores.parquet"))
    write_table(df, out, ADVANTAGES)
    return df, state, stats


@task(name="update", cache_policy=NO_CACHE, persist_result=False)
def update_task(w: Warm, samples: pl.DataFrame, advantages: pl.DataFrame) -> dict:
    return update_round(w, samples, advantages)


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(w: Warm, version: int) -> dict:
    from stages.evaluate import evaluate_policy, generate_one

    p = w.params
    if w.ref_eval is None:
        raise RuntimeError("reference eval completions were not prepared")
    pol = generate_one(w.sampler, w.tokenizer, w.eval_prompts, p, p.base.seed, version)
    ref_samples, ref_scores = w.ref_eval
    _, metrics = evaluate_policy(pol, ref_samples, ref_scores, w.rewards, w.trainer.model, w.ref, w.tokenizer, w.eval_prompts, p.score.batch_size)
    return metrics


# ---------------------------------------------------------------- the flow


def _lower_priority() -> None:
    """The writer thread yields the cores to sampling and scoring (Linux: per-thread nice)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class RoundWriter:
    """Writes a round's checkpoint and then its manifest, in one background thread, one round at a time.

    The write overlaps the next round's sampling and scoring: they only read the policy, and the flow calls
    `wait()` before the next update changes the weights and optimizer state, so the checkpoint is the exact
    state after round r without a copy of it. The manifest (the mark of a complete round) is written after
    the checkpoint, as before: a crash during the write leaves round r incomplete, and a resume re-runs it.
    A failed write is raised by the next `wait()`. With `enabled=False` the write happens in the caller.
    """

    def __init__(self, enabled: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="round-writer", initializer=_lower_priority) if enabled else None
        self.pending = None

    def submit(self, fn) -> None:
        self.wait()
        if self.pool is None:
            fn()
        else:
            self.pending = self.pool.submit(fn)

    def wait(self) -> float:
        """Block until the pending write is on disk; the seconds spent waiting."""
        t0 = time.perf_counter()
        if self.pending is not None:
            fut, self.pending = self.pending, None
            fut.result()
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def _round_markdown(r: int, rounds: int, m: dict) -> str:
    keys = ["reward", "reward_std", "kl", "rlhf_reward", "advantage_std", "loss", "grad_norm", "entropy",
            "completions/mean_length", "completions/clipped_ratio", "time/round_s"]
    rows = "\n".join(f"| {k} | {m[k]:.4f} |" for k in keys if isinstance(m.get(k), (int, float)))
    return f"### Round {r + 1} of {rounds}\n\n| metric | value |\n|---|---|\n{rows}\n"


@flow(name="rloo-train", log_prints=False)
def train_flow(params_path: str = "params.yaml", rounds: int | None = None, overrides: dict | None = None) -> dict:
    """RLOO training: `rounds` rounds of sample -> score -> advantage -> update, resources kept warm."""
    from stages import tracking
    from stages.io import write_json

    logger = get_run_logger()
    params = load_params(params_path, overrides)
    total = rounds or params.train.rounds
    tp = params.train
    rounds_dir, ckpt_dir = Path(tp.rounds_dir), Path(tp.checkpoint_dir)
    chash = config_hash(params)

    # ---- resume or start clean
    done, other = completed_rounds(rounds_dir, chash)
    ckpt_state = _checkpoint_extra(ckpt_dir)
    if ckpt_state and ckpt_state.get("config_hash") == chash:
        # a crash between checkpoint and manifest: the checkpoint carries the round's manifest
        m = ckpt_state.get("manifest")
        if m and m["round"] == len(done):
            write_json(m, round_dir(rounds_dir, m["round"]) / MANIFEST)
            done.append(m)
            logger.info("repaired the manifest of round %d from its checkpoint", m["round"] + 1)
    ckpt_round = ckpt_state.get("round", 0) if ckpt_state and ckpt_state.get("config_hash") == chash else 0
    if ckpt_round > len(done):
        logger.warning("checkpoint %s is at round %d but only %d rounds have manifests: starting clean", ckpt_dir, ckpt_round, len(done))
        other = True
    if other or (ckpt_state and ckpt_state.get("config_hash") != chash):
        logger.warning("configuration changed (now %s): starting clean, removing %s and %s", chash, rounds_dir, ckpt_dir)
        shutil.rmtree(rounds_dir, ignore_errors=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        done, ckpt_round = [], 0
    start = min(len(done), ckpt_round)
    done = done[:start]
    for d in Path(rounds_dir).glob("round=*"):  # partial or superseded rounds
        idx = int(d.name.split("=")[1])
        if idx >= start:
            shutil.rmtree(d, ignore_errors=True)
    if start:
        logger.info("resuming after round %d of %d (config %s)", start, total, chash)
    if start >= total:
        logger.info("all %d rounds already complete", total)

    # ---- warm resources, loaded once
    t0 = time.perf_counter()
    w = load_warm(params, total, resume_from=ckpt_dir if start else None, with_eval=bool(tp.eval_every) and start < total)
    w.adv_state = done[-1]["advantage_state"] if done else None
    trainer, sampler = w.trainer, w.sampler
    warm_s = time.perf_counter() - t0
    logger.info("warm resources ready in %.1f s (sampler: %s)", warm_s, sampler.name)

    run = tracking.start_run(params, chash, rounds_dir, resume_id=(done[-1].get("mlflow_run_id") if done else None))
    tracking.log_metric_dict({"time/warm_start_s": warm_s}, step=start)
    history = [m["metrics"] for m in done]
    writer = RoundWriter(tp.async_checkpoint)
    t_rounds = time.perf_counter()
    try:
        for r in range(start, total):
            tr = time.perf_counter()
            d = round_dir(rounds_dir, r)
            prompts = round_prompts(w.train_prompts, r, tp.prompts_per_round, params.base.seed)
            samples, s_stats = sample_task(w, r, prompts, d / "samples.parquet")
            scores, sc_stats = score_task(w, samples, d / "scores.parquet")
            advs, new_state, a_stats = advantage_task(w, scores, d / "advantages.parquet")
            wait_s = writer.wait()  # the previous round's checkpoint is on disk before the weights change
            u_stats = update_task(w, samples, advs)
            u_stats["time/checkpoint_wait_s"] = wait_s
            w.adv_state = new_state
            metrics = {**s_stats, **sc_stats, **u_stats,
                       "advantage_std": a_stats["advantage_std"], "advantage_mean": a_stats["advantage_mean"],
                       "baseline_mean": a_stats["baseline_mean"], "singleton_groups": a_stats["singleton_groups"]}
            if tp.eval_every and (r + 1) % tp.eval_every == 0:
                metrics.update({f"eval/{k}": v for k, v in evaluate_task(w, r + 1).items()})
            metrics["time/round_s"] = time.perf_counter() - tr
            manifest = {
                "round": r,
                "config_hash": chash,
                "params_hash": params.hash(),
                "policy_version": r,
                "rows": {"samples": samples.height, "scores": scores.height, "advantages": advs.height},
                "metrics": metrics,
                "advantage_state": new_state,
                "mlflow_run_id": run.info.run_id if run else None,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            save = (r + 1) % params.update.save_every == 0 or r + 1 == total
            writer.submit(_round_writer(trainer, ckpt_dir if save else None, manifest, d / MANIFEST, chash, r))
            history.append(metrics)
            tracking.log_round(metrics, step=r + 1, samples=samples, scores=scores, advantages=advs, n=params.mlflow.log_completions)
            create_markdown_artifact(_round_markdown(r, total, metrics), key="rloo-round", description=f"round {r + 1}")
            logger.info(
                "round %d/%d: reward %.3f, kl %.4f, loss %.4f, %.1f s (sample %.1f, update %.1f)",
                r + 1, total, metrics["reward"], metrics["kl"], metrics["loss"], metrics["time/round_s"],
                metrics["time/sample_s"], metrics["time/update_s"],
            )
        writer.close()
        summary = _write_train_outputs(history, total, chash, warm_s, t0, total - start, time.perf_counter() - t_rounds)
        tracking.finish_run(summary, history)
        return summary
    except BaseException:
        try:
            writer.close()  # the completed rounds' checkpoint and manifest still reach the disk
        finally:
            tracking.finish_run(None, history, failed=True)
        raise
    finally:
        sampler.close()


def _checkpoint_extra(ckpt_dir: Path) -> dict | None:
    from stages.update import STATE_FILE

    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        raise PipelineError(f"{path}: corrupt checkpoint; delete {ckpt_dir} to start over") from None
    return state.get("extra") or {}


def _round_writer(trainer, ckpt_dir: Path | None, manifest: dict, manifest_path: Path, chash: str, r: int):
    """The write of round r: its checkpoint (when due), then its manifest (the round is complete from then on).
    The RNG state is taken now, in the flow's thread; the weights and optimizer state are read in the writer's
    thread, which is safe because the flow waits for it before the next update."""
    from stages.io import write_json

    rng = trainer.rng_state()

    def write() -> None:
        m = dict(manifest)
        if ckpt_dir is not None:
            tc = time.perf_counter()
            trainer.save(ckpt_dir, extra={"config_hash": chash, "round": r + 1, "manifest": manifest}, rng=rng)
            m["checkpoint_s"] = time.perf_counter() - tc
        write_json(m, manifest_path)

    return write


def _write_train_outputs(history: list[dict], total: int, chash: str, warm_s: float, t0: float, rounds_run: int,
                         rounds_wall_s: float) -> dict:
    """metrics/train.json (last round + run facts) and plots/train.csv (one row per round).

    `seconds_per_round` is the rounds' own time; `wall_s` is this invocation from the start of the warm-up;
    `rounds_wall_s` is the loop over the rounds with their checkpoints, Parquet, MLflow and
    Prefect, and the wait for the last checkpoint (not the warm-up, nor the MLflow run's start)."""
    from stages.io import atomic_path, write_json

    last = history[-1] if history else {}
    keep = ["reward", "reward_std", "kl", "rlhf_reward", "loss", "entropy", "advantage_std", "completions/mean_length"]
    summary = {k: last[k] for k in keep if k in last}
    summary |= {"rounds": total, "config_hash": chash,
                "seconds_per_round": sum(h["time/round_s"] for h in history) / max(len(history), 1),
                "warm_start_s": warm_s, "wall_s": time.perf_counter() - t0, "rounds_run": rounds_run,
                "rounds_wall_s": rounds_wall_s}
    gv = [h for h in history if h.get("grad/variance") is not None]
    if gv:  # update.grad_variance: the run's means, so `dvc exp show` compares estimators on them
        var = sum(h["grad/variance"] for h in gv) / len(gv)
        summary |= {"grad_variance_mean": var,
                    "grad_snr": sum(h["grad/signal"] for h in gv) / len(gv) / var if var > 0 else None}
    write_json(summary, "metrics/train.json")
    cols = ["reward", "reward_std", "kl", "rlhf_reward", "loss", "entropy", "advantage_std",
            "completions/mean_length", "time/round_s", "eval/reward", "eval/win_rate", "eval/kl", "grad/variance", "grad/snr"]
    rows = [{"round": i + 1, **{c.replace("/", "_"): h.get(c) for c in cols}} for i, h in enumerate(history)]
    with atomic_path("plots/train.csv", ".csv") as tmp:
        pl.DataFrame(rows, infer_schema_length=None).write_csv(tmp)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.train", description="Run the RLOO training flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    load_params(args.params)  # fail fast, before Prefect starts
    train_flow(params_path=args.params, rounds=args.rounds)


if __name__ == "__main__":
    run_cli(main)
