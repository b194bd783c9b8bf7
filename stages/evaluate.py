"""evaluate: the trained policy against the reference policy on held-out prompts.

Reads  `data/prepared/eval.parquet`, the policy checkpoint (`train.checkpoint_dir`) and the reference
       (`score.ref_model` or `base.model_dir`).
Writes `data/eval/eval.parquet` (per prompt: both policies' completions side by side with their scores,
       the policy completion's logprobs under both models and its KL), `metrics/eval.json` and
       `data/eval/examples.md` (a few example completions).

Metrics (`metrics/eval.json`): `reward` (policy's mean task score), `ref_reward` (reference's), `reward_gain`
(their paired difference), `win_rate` (fraction of prompts where the policy's completion scores higher than the
reference's, ties counted half), `reward_gain_ci95` / `win_rate_ci95` (95 % paired-bootstrap intervals over the
held-out prompts, fixed seed), `kl` (mean of logp_policy - logp_ref over the policy's completions, sequence level),
`mean_length` / `ref_mean_length` (completion tokens), `distinct_2` / `ref_distinct_2` / `distinct_2_ratio`
(distinct word bigrams over all held-out completions together: a guard against reward hacking; the ratio is
`null` when the reference's completions hold no bigram, so the file stays strict JSON), `prompts`. Decoding is greedy unless `evaluate.greedy: false`
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

from stages.errors import PipelineError, bad_input_exits, run_cli
from stages.runtime import preload_malloc, share_note

# the command re-executes itself once with tcmalloc preloaded (RLOO_MALLOC), as training does: its vLLM engine asks
# for it (docs/design.md §7); before numpy, polars and torch load
if __name__ == "__main__":
    with bad_input_exits():
        preload_malloc()

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

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


def generate_one(sampler, tokenizer, prompts: pl.DataFrame, params, seed: int, policy_version: int,
                 logprobs: bool = True) -> pl.DataFrame:
    """One completion per held-out prompt. `logprobs`: ask the engine for each token's logprob; they are used only
    for the policy's completions from an engine whose logprobs are exact, where they replace its logprob pass
    (`evaluate_policy`'s `sampler_exact`)."""
    from stages.sample import generation_config, sample_prompts

    ev = params.evaluate
    cfg = generation_config(params.sample, k=1, max_tokens=ev.max_completion_length, greedy=ev.greedy,
                            logprobs=logprobs)
    df, _ = sample_prompts(sampler, tokenizer, prompts, cfg, seed, -1, policy_version, params.sample.max_model_len)
    return df


def task_scores(df: pl.DataFrame, rewards, prompts: pl.DataFrame, on_invalid: str = "error",
                side: str = "") -> np.ndarray:
    """The task reward of each held-out completion. A reward's NaN/inf is handled as `score.on_invalid` says, as in
    training: `error` stops with the row; `drop` leaves the score NaN, and `eval_metrics` leaves such prompts out.
    A completion that every reward returned None for is NaN too (unscored, `combine`), so its prompt is left out;
    `side` names whose completions they are in the warning ("the policy's", "the reference's")."""
    from stages.rewards import combine, compute_rewards, invalid_rows, unscored_rows
    from stages.score import reward_inputs

    keys = list(zip(df["prompt_id"], df["sample_idx"]))
    texts, columns = reward_inputs(df, prompts)
    comps = compute_rewards(rewards, texts, df["completion"].to_list(), keys, **columns)  # TRL's extras at step 0
    invalid_rows(comps, keys, on_invalid, "held-out prompt_id={pid} in the evaluation",
                 "leave such prompts out of the metrics")  # `drop`: combine's NaN marks them
    scores = combine(comps, {r.name: r.weight for r in rewards})
    unscored = int(unscored_rows(comps).sum())
    if unscored:
        log.warning("%d of %d held-out completions%s got None from every reward: their prompts are left out of the "
                    "metrics%s; make some reward apply to them", unscored, df.height, f" ({side})" if side else "",
                    share_note())
    return scores


def eval_temperature(params) -> float:
    """The temperature of the held-out completions' distribution, which their KL is of: 1 with greedy decoding (the
    raw logits' argmax), else `sample.temperature`."""
    return 1.0 if params.evaluate.greedy else params.sample.temperature


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
    sampler_exact: bool = False,
    ref_prompt_cache=None,
    policy_batches: int = 0,
    on_invalid: str = "error",
    with_metrics: bool = True,
    temperature: float = 1.0,
) -> tuple[pl.DataFrame, dict | None]:
    """Score the policy's completions, KL to the reference, and compare with the reference's completions.
    `sampler_exact`: the completions' sampler logprobs are the fp32 policy's own (docs/design.md §7), so the
    policy's logprob pass is skipped (greedy decoding: raw logprobs, no temperature). `ref_prompt_cache`: the
    reference's keys and values of these prompts (`stages.logprobs.PromptCache`, made once per run by the flow);
    `policy_batches`: the least batches the policy pass runs (a sharded policy, `sequence_logprobs`' min_batches);
    `on_invalid`: `score.on_invalid`, for a reward's NaN/inf (`task_scores`); `with_metrics` False: the table only
    (a rank's share of the held-out prompts, whose metrics come from the gathered table); `temperature`: of the
    distribution the completions were drawn from, the KL's (`eval_temperature`; the sampler's raw logprobs are
    used only at 1)."""
    from stages.logprobs import sequence_logprobs
    from stages.score import completion_inputs

    scores = task_scores(policy_samples, rewards, prompts, on_invalid, "the policy's")
    p_ids, c_ids = completion_inputs(policy_samples, tokenizer)
    pad = tokenizer.pad_token_id
    if sampler_exact and temperature == 1.0:
        logp_pol = [float(sum(x)) for x in policy_samples["sampler_logprobs"]]
    else:
        logp_pol, _ = sequence_logprobs(policy, p_ids, c_ids, pad, batch_size, progress="eval logp policy",
                                        min_batches=policy_batches, temperature=temperature)
    logp_ref = list(logp_pol) if ref is policy else sequence_logprobs(ref, p_ids, c_ids, pad, batch_size,
                                                                      progress="eval logp ref",
                                                                      prompt_cache=ref_prompt_cache,
                                                                      temperature=temperature)[0]
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
    return table, eval_metrics(table) if with_metrics else None


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams, counted over all `texts` together (Li et al. 2016,
    https://arxiv.org/abs/1510.03055): one sentence said to every prompt scores low even if each completion alone
    has no repeats. Words: lowercased, split on whitespace."""
    grams = [tuple(ws[i : i + n]) for t in texts for ws in [t.lower().split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def paired_bootstrap(policy: np.ndarray, ref: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """95 % percentile intervals of the reward gain (mean policy - reference) and of the win-rate, resampling the
    held-out prompts with replacement (both policies' scores of a prompt stay paired). Fixed seed: reproducible."""
    n = len(policy)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))  # (resamples, n): prompt indices of each resample
    diff = policy - ref
    wins = (diff > 0).astype(float) + 0.5 * (diff == 0)
    gains, rates = diff[idx].mean(axis=1), wins[idx].mean(axis=1)
    return {"reward_gain_ci95": [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))],
            "win_rate_ci95": [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]}


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """Metrics with each [low, high] interval as `<name>_low` / `<name>_high` (MLflow and CSV take scalars)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)) and len(v) == 2:
            out[f"{prefix}{k}_low"], out[f"{prefix}{k}_high"] = v
        else:
            out[f"{prefix}{k}"] = v
    return out


def eval_metrics(table: pl.DataFrame) -> dict:
    """The held-out metrics of an evaluation table (policy and reference side by side, one row per prompt): point
    values, 95 % paired-bootstrap intervals of the reward gain and the win-rate, and the completions' diversity
    (distinct-2 over all of them, against the reference's: a policy that says one positive sentence to every prompt
    is reward hacking, not learning). Prompts where either score is NaN/inf (a reward's, under `score.on_invalid:
    drop`) are left out and counted (`dropped`); with none left it stops."""
    pol, ref = table["score"].to_numpy(), table["ref_score"].to_numpy()
    ok = np.isfinite(pol) & np.isfinite(ref)
    if not ok.all():
        if not ok.any():
            raise PipelineError(f"every one of the {table.height} held-out prompts has a NaN/inf reward, or none, for "
                                "the policy or the reference: no metric to report; fix the reward")
        return eval_metrics(table.filter(pl.Series(ok))) | {"dropped": int((~ok).sum())}
    d2, ref_d2 = distinct_n(table["completion"].to_list()), distinct_n(table["ref_completion"].fill_null("").to_list())
    return {
        "reward": float(pol.mean()),
        "ref_reward": float(ref.mean()),
        "reward_gain": float((pol - ref).mean()),
        "win_rate": win_rate(pol, ref),
        **paired_bootstrap(pol, ref),
        "kl": float(table["kl"].mean()),
        "mean_length": float(table["num_tokens"].mean()),
        "ref_mean_length": float(table["ref_num_tokens"].mean()),
        "distinct_2": d2,
        "ref_distinct_2": ref_d2,
        # undefined against no reference bigram: null, not NaN (which is not JSON: jq and strict parsers refuse it)
        "distinct_2_ratio": d2 / ref_d2 if ref_d2 else None,
        "prompts": table.height,
    }


def examples_markdown(table: pl.DataFrame, metrics: dict, n: int) -> str:
    lines = [
        "# Evaluation: policy vs reference",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {'n/a' if v is None else v} |"
          for k, v in metrics.items()],
        "",
    ]
    scored = table.filter(pl.col("score").is_finite() & pl.col("ref_score").is_finite())  # NaN: left out (drop)
    for row in scored.sort("score", descending=True).head(n).iter_rows(named=True):
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


# The CLI below (arguments, file I/O) is tested end to end in subprocesses, which mutation testing cannot see;
# `make mutate` leaves it out (docs/design.md §10).
# pragma: no mutate block
def main(argv: list[str] | None = None) -> None:
    from stages.io import read_table, write_json, write_table, write_text
    from stages.models import load_causal_lm, load_tokenizer
    from stages.params import load_params
    from stages.rewards import build_rewards
    from stages.runtime import configure_env, setup_torch
    from stages.sample import make_sampler
    from stages.models import check_model_dir
    from stages.schemas import PROMPTS

    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description="Policy vs reference on held-out prompts.")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    parser.add_argument("--prompts", default="data/prepared/eval.parquet")
    parser.add_argument("--policy", default=None,
                        help="policy checkpoint, or any transformers model dir (default: train.checkpoint_dir)")
    parser.add_argument("--out-dir", default=str(EVAL_DIR))
    parser.add_argument("--metrics", default=str(METRICS))
    parser.add_argument("--examples", default=str(EXAMPLES))
    args = parser.parse_args(argv)

    from stages import checkpoint

    params = load_params(args.params)
    configure_env(params.base.threads)
    device = setup_torch(params.base.device, params.base.threads, params.base.seed)
    prompts = read_table(args.prompts, PROMPTS)
    field = "--policy" if args.policy else "train.checkpoint_dir"
    policy_dir = Path(args.policy or params.train.checkpoint_dir)
    ref_dir = params.score.ref_model or params.base.model_dir
    check_model_dir(policy_dir, field, "fix the path" if args.policy else
                    "train first (`dvc repro train` or `python -m flows.train`), or evaluate another dir with --policy")
    # --policy may be any transformers model dir (e.g. another trainer's output): evaluating only reads it
    plain = args.policy is not None and not (policy_dir / checkpoint.META).is_file()
    meta = None if plain else checkpoint.read_meta(policy_dir, field)
    version = int(meta["round"]) if meta else 0
    t0 = time.perf_counter()
    # Both models load (and a damaged file fails, naming its field) before the engine starts.
    policy = load_causal_lm(policy_dir, "float32", device, field).eval()
    ref = load_causal_lm(ref_dir, "float32", device, "score.ref_model" if params.score.ref_model else "base.model_dir").eval()
    tokenizer = load_tokenizer(ref_dir, "score.ref_model")
    rewards = build_rewards(params.score.rewards, device=device, batch_size=params.score.batch_size)
    sampler = make_sampler(str(ref_dir), params)
    try:
        exact = sampler.exact_logprobs and eval_temperature(params) == 1.0
        ref_samples = generate_one(sampler, tokenizer, prompts, params, params.base.seed, 0, logprobs=False)
        sampler.update_weights(state_dict=policy.state_dict())
        policy_samples = generate_one(sampler, tokenizer, prompts, params, params.base.seed, version, logprobs=exact)
    finally:
        sampler.close()
    ref_scores = task_scores(ref_samples, rewards, prompts, params.score.on_invalid, "the reference's")
    table, metrics = evaluate_policy(policy_samples, ref_samples, ref_scores, rewards, policy, ref, tokenizer, prompts,
                                     params.score.batch_size, sampler_exact=exact, on_invalid=params.score.on_invalid,
                                     temperature=eval_temperature(params))
    metrics["policy_version"] = version
    metrics["time/evaluate_s"] = time.perf_counter() - t0
    write_table(table, Path(args.out_dir) / "eval.parquet")
    examples = examples_markdown(table, metrics, params.evaluate.num_examples)
    write_text(examples, args.examples)
    write_json(flat_metrics(metrics), args.metrics)
    log.info("eval: reward %.3f vs ref %.3f, win-rate %.2f, kl %.3f", metrics["reward"], metrics["ref_reward"], metrics["win_rate"], metrics["kl"])
    run_id = ((meta or {}).get("manifest") or {}).get("mlflow_run_id")
    if run_id:  # the training run's MLflow run gets the headline numbers too (a checkpoint of a training run only)
        from stages import tracking

        tracking.log_final_eval(params, run_id, flat_metrics(metrics), version, examples)


if __name__ == "__main__":
    run_cli(main)
