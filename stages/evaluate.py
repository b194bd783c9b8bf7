"""evaluate: the trained policy against the reference policy on held-out prompts.

Reads  `data/prepared/eval.parquet`, the policy checkpoint (`train.checkpoint_dir`) and the reference
       (`score.ref_model` or `base.model_dir`).
Writes `data/eval/eval.parquet` (per prompt: both policies' completions side by side with their scores,
       the policy completion's logprobs under both models and its KL), `metrics/eval.json` and
       `data/eval/examples.md` (a few example completions).

Metrics (`metrics/eval.json`): `reward` (policy's mean task score), `ref_reward` (reference's),
`win_rate` (fraction of prompts where the policy's completion scores higher than the reference's, ties
counted half), `kl` (mean of logp_policy - logp_ref over the policy's completions, sequence level),
`mean_length` / `ref_mean_length` (completion tokens). Decoding is greedy unless `evaluate.greedy: false`
(then sampled with `sample.temperature`, one completion per prompt, seeded).

The training flow calls `evaluate_policy` with its warm engine and models; the reference completions
do not change during a run, so the flow computes them once.

Run: `python -m stages.evaluate [--policy DIR] [--prompts data/prepared/eval.parquet]` (DVC stage `evaluate`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl

from stages.errors import run_cli

log = logging.getLogger(__name__)

EVAL_DIR = Path("data/eval")
METRICS = Path("metrics/eval.json")
EXAMPLES = Path("data/eval/examples.md")


def win_rate(policy_scores: np.ndarray, ref_scores: np.ndarray) -> float:
    """Fraction of prompts where the policy beats the reference; ties count half."""
    if len(policy_scores) == 0:
        return float("nan")
    wins = (policy_scores > ref_scores).astype(float) + 0.5 * (policy_scores == ref_scores)
    return float(wins.mean())


def generate_one(sampler, tokenizer, prompts: pl.DataFrame, params, seed: int, policy_version: int) -> pl.DataFrame:
    from stages.sample import GenerationConfig, sample_prompts

    ev = params.evaluate
    cfg = GenerationConfig(1, ev.max_completion_length, params.sample.temperature, params.sample.top_p,
                           list(params.sample.stop), greedy=ev.greedy)
    df, _ = sample_prompts(sampler, tokenizer, prompts, cfg, seed, -1, policy_version, params.sample.max_model_len)
    return df


def task_scores(df: pl.DataFrame, rewards, prompts: pl.DataFrame) -> np.ndarray:
    from stages.rewards import combine, compute_rewards
    from stages.score import reward_inputs

    keys = list(zip(df["prompt_id"], df["sample_idx"]))
    texts, columns = reward_inputs(df, prompts)
    comps = compute_rewards(rewards, texts, df["completion"].to_list(), keys, **columns)
    return combine(comps, {r.name: r.weight for r in rewards})


def evaluate_policy(
    policy_samples: pl.DataFrame,
    ref_samples: pl.DataFrame,
    ref_scores: np.ndarray,
    rewards,
    policy,
    ref,
    tokenizer,
    prompts: pl.DataFrame,
    batch_size: int = 16,
) -> tuple[pl.DataFrame, dict]:
    """Score the policy's completions, KL to the reference, and compare with the reference's completions."""
    from stages.logprobs import sequence_logprobs
    from stages.score import completion_inputs

    scores = task_scores(policy_samples, rewards, prompts)
    p_ids, c_ids = completion_inputs(policy_samples, tokenizer)
    pad = tokenizer.pad_token_id
    logp_pol, _ = sequence_logprobs(policy, p_ids, c_ids, pad, batch_size, progress="eval logp policy")
    logp_ref = list(logp_pol) if ref is policy else sequence_logprobs(ref, p_ids, c_ids, pad, batch_size, progress="eval logp ref")[0]
    kl = np.asarray(logp_pol) - np.asarray(logp_ref)
    ref_by_id = ref_samples.select(
        "prompt_id", ref_completion="completion", ref_num_tokens="num_tokens"
    ).with_columns(ref_score=pl.Series(ref_scores))
    table = (
        policy_samples.select("prompt_id", "prompt_text", "completion", "num_tokens", "finish_reason", "policy_version")
        .with_columns(
            score=pl.Series(scores),
            logp_policy=pl.Series(np.asarray(logp_pol)),
            logp_ref=pl.Series(np.asarray(logp_ref)),
            kl=pl.Series(kl),
        )
        .join(ref_by_id, on="prompt_id", how="left", maintain_order="left")
    )
    metrics = {
        "reward": float(table["score"].mean()),
        "ref_reward": float(table["ref_score"].mean()),
        "win_rate": win_rate(table["score"].to_numpy(), table["ref_score"].to_numpy()),
        "kl": float(table["kl"].mean()),
        "mean_length": float(table["num_tokens"].mean()),
        "ref_mean_length": float(table["ref_num_tokens"].mean()),
        "prompts": table.height,
    }
    return table, metrics


def examples_markdown(table: pl.DataFrame, metrics: dict, n: int) -> str:
    lines = [
        "# Evaluation: policy vs reference",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
        "",
    ]
    for row in table.sort("score", descending=True).head(n).iter_rows(named=True):
        lines += [
            f"## prompt `{row['prompt_id']}` (policy {row['score']:+.3f} vs reference {row['ref_score']:+.3f})",
            "",
            "**Prompt:** " + row["prompt_text"].replace("\n", " ").strip()[-300:],
            "",
            "**Policy:** " + row["completion"].replace("\n", " ").strip(),
            "",
            "**Reference:** " + (row["ref_completion"] or "").replace("\n", " ").strip(),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from stages.io import read_table, write_json, write_table, write_text
    from stages.models import load_causal_lm, load_tokenizer
    from stages.params import load_params
    from stages.rewards import build_rewards
    from stages.runtime import configure_env, setup_torch
    from stages.sample import make_sampler
    from stages.schemas import PROMPTS
    from stages.update import STATE_FILE

    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description="Policy vs reference on held-out prompts.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prompts", default="data/prepared/eval.parquet")
    parser.add_argument("--policy", default=None, help="policy checkpoint (default: train.checkpoint_dir)")
    parser.add_argument("--out-dir", default=str(EVAL_DIR))
    parser.add_argument("--metrics", default=str(METRICS))
    parser.add_argument("--examples", default=str(EXAMPLES))
    args = parser.parse_args(argv)

    params = load_params(args.params)
    configure_env(params.base.threads)
    device = setup_torch(params.base.device, params.base.threads, params.base.seed)
    prompts = read_table(args.prompts, PROMPTS)
    policy_dir = Path(args.policy or params.train.checkpoint_dir)
    ref_dir = params.score.ref_model or params.base.model_dir
    from stages.models import check_model_dir

    check_model_dir(policy_dir, "--policy" if args.policy else "train.checkpoint_dir")
    state = Path(policy_dir, STATE_FILE)
    version = 0
    if state.is_file():
        import torch

        version = int(torch.load(state, map_location="cpu", weights_only=False, mmap=True).get("round", 0))
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(ref_dir, "score.ref_model")
    rewards = build_rewards(params.score.rewards, device=device, batch_size=params.score.batch_size)
    sampler = make_sampler(str(ref_dir), params)
    try:
        ref_samples = generate_one(sampler, tokenizer, prompts, params, params.base.seed, 0)
        sampler.update_weights(path=str(policy_dir))
        policy_samples = generate_one(sampler, tokenizer, prompts, params, params.base.seed, version)
    finally:
        sampler.close()
    ref = load_causal_lm(ref_dir, "float32", device, "score.ref_model").eval()
    policy = load_causal_lm(policy_dir, "float32", device, "train.checkpoint_dir").eval()
    ref_scores = task_scores(ref_samples, rewards, prompts)
    table, metrics = evaluate_policy(policy_samples, ref_samples, ref_scores, rewards, policy, ref, tokenizer, prompts, params.score.batch_size)
    metrics["policy_version"] = version
    metrics["time/evaluate_s"] = time.perf_counter() - t0
    write_table(table, Path(args.out_dir) / "eval.parquet")
    write_text(examples_markdown(table, metrics, params.evaluate.num_examples), args.examples)
    write_json(metrics, args.metrics)
    log.info("eval: reward %.3f vs ref %.3f, win-rate %.2f, kl %.3f", metrics["reward"], metrics["ref_reward"], metrics["win_rate"], metrics["kl"])


if __name__ == "__main__":
    run_cli(main)
