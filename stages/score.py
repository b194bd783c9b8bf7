"""score: task reward, KL to the reference policy, and `rlhf_reward`, in batches.

Reads  `samples.parquet` (schema `SAMPLES`) and, for reward functions, the prompts table (raw `prompt`
       and any extra columns, e.g. a reference `answer`, joined on `prompt_id`).
Writes `scores.parquet` (schema `SCORES`): keys, `score`, one `score/<name>` per reward component,
       `logp_policy`, `logp_ref`, `kl`, `rlhf_reward`, plus `num_tokens` and `finish_reason`.

Formulas (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, §3; TRL's RLOOTrainer):
- `score = sum_i w_i * r_i` over `score.rewards` (see stages/rewards.py for every kind).
- `logp_* = sum_t log pi(y_t | x, y_<t)` over the completion tokens (EOS included), no gradient, in
  `score.dtype` (auto: bf16 autocast where bf16 is native, ~0.2 nats of |error| per sequence's KL and 2 % on the
  batch's mean KL; fp32 elsewhere; docs/design.md §7). The evaluation's KL is always fp32.
- `kl = logp_policy - logp_ref` (sequence level, as in the paper); `score.kl_level: token` divides it by
  the completion's token count (mean per-token KL).
- `rlhf_reward = score - beta * kl - missing_eos_penalty * [finish_reason == "length"]`.
Invalid rewards (NaN/inf): `score.on_invalid: error` stops with the reward's name and the first
offending key; `drop` leaves the row out of scores.parquet (so out of the baseline and the update) and
counts it.

Run: `python -m stages.score --samples samples.parquet --out scores.parquet
      [--prompts data/prepared/train.parquet] [--policy DIR] [--ref DIR]`
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import polars as pl

from stages.errors import PipelineError, run_cli
from stages.logprobs import sequence_logprobs
from stages.runtime import score_dtype, share_note
from stages.schemas import RESERVED_COLUMNS, SCORES, sample_digest

log = logging.getLogger(__name__)


def kl_and_reward(
    score: np.ndarray,
    logp_policy: np.ndarray,
    logp_ref: np.ndarray,
    num_tokens: np.ndarray,
    truncated: np.ndarray,
    beta: float,
    kl_level: str = "sequence",
    missing_eos_penalty: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(kl, rlhf_reward) per completion; see the module docstring."""
    kl = logp_policy - logp_ref
    if kl_level == "token":
        kl = kl / np.maximum(num_tokens, 1)
    reward = score - beta * kl
    if missing_eos_penalty:
        reward = reward - missing_eos_penalty * truncated.astype(np.float64)
    return kl, reward


def completion_inputs(samples: pl.DataFrame, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt token ids (re-tokenized exactly as the sampler did) and completion token ids."""
    cache: dict[str, list[int]] = {}
    prompts = []
    for text in samples["prompt_text"]:
        if text not in cache:
            cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(cache[text])
    return prompts, [list(c) for c in samples["completion_token_ids"]]


def extra_columns(prompts: pl.DataFrame) -> list[str]:
    """The prompts table's columns that reach the reward functions by name (besides the prompt text itself)."""
    return [c for c in prompts.columns if c not in ("prompt_id", "prompt", "messages", "conversational")]


def reward_inputs(samples: pl.DataFrame, prompts: pl.DataFrame | None) -> tuple[list[str], dict[str, list]]:
    """What the reward functions get besides the completions: the raw user prompts (falling back to prompt_text), and
    keyword inputs: `completion_ids`, `messages` (the chat turns, when the prompts are conversational) and every extra
    column of the prompts table by name (e.g. a reference `answer`). Each sample's row of the table is found by its
    prompt_id: a table without some sample's prompt, or with a prompt_id twice, is refused (its columns would reach
    the wrong completions)."""
    inputs: dict[str, list] = {"completion_ids": samples["completion_token_ids"].to_list()}
    if prompts is None:
        return samples["prompt_text"].to_list(), inputs
    extra = extra_columns(prompts)
    clash = [c for c in extra if c in RESERVED_COLUMNS]
    if clash:
        raise PipelineError(f"prompts table: column `{clash[0]}` has the name of a reward function's own argument; "
                            f"rename it (python -m stages.prepare keeps a source's as `source_{clash[0]}`)")
    if prompts["prompt_id"].is_duplicated().any():
        dup = prompts.filter(pl.col("prompt_id").is_duplicated())["prompt_id"][0]
        raise PipelineError(f"prompts table: prompt_id {dup} appears more than once; use the table "
                            "python -m stages.prepare wrote (one row per prompt)")
    missing = samples.filter(~pl.col("prompt_id").is_in(prompts["prompt_id"].implode()))
    if missing.height:
        raise PipelineError(f"prompts table: it has no row for prompt_id {missing['prompt_id'][0]} of the samples "
                            f"({missing['prompt_id'].n_unique()} prompt(s) missing); pass the table the samples were "
                            "drawn from (data/prepared/train.parquet for training rounds, eval.parquet for evaluation)")
    cols = ["prompt_id", "prompt", *extra, *[c for c in ("messages", "conversational") if c in prompts.columns]]
    joined = samples.select("prompt_id").join(prompts.select(cols), on="prompt_id", how="left", maintain_order="left")
    texts = [p if p is not None else t for p, t in zip(joined["prompt"], samples["prompt_text"])]
    inputs |= {c: joined[c].to_list() for c in extra}
    if "conversational" in joined.columns and joined["conversational"].fill_null(False).any():
        inputs["messages"] = [json.loads(m) if m is not None else None for m in joined["messages"]]
    return texts, inputs


def score_samples(
    samples: pl.DataFrame,
    rewards,
    policy,
    ref,
    tokenizer,
    score_params,
    prompts: pl.DataFrame | None = None,
    logp_policy: list[float] | Callable[[], list[float]] | None = None,
    share_prompts: bool = True,
    steps: tuple[int, int] = (0, 0),
    policy_batches: int = 0,
    batch_size: int = 0,
    temperature: float = 1.0,
) -> tuple[pl.DataFrame, dict]:
    """The score stage's computation. `ref` may be the same object as `policy` (then kl = 0 exactly);
    `logp_policy` may be passed when the caller already has it, or a function that computes it (called after the
    reference pass); `share_prompts`: base.share_prompts; `steps`:
    (optimizer steps before this round, of the whole run) for TRL's `trainer_state` (see `optimizer_steps`);
    `policy_batches`: the least batches the policy pass runs (a sharded policy, `sequence_logprobs`' min_batches);
    `batch_size`: completions per logprob batch, default `score.batch_size` (the flow passes the update's
    micro-batch when `logp_policy` came from it: a bf16 pass's logprobs depend on the batch's padding, and the
    KL's two passes must batch alike for their rounding to cancel, docs/design.md §7); `temperature`:
    `sample.temperature`, the distribution both logprobs are of (as TRL, docs/design.md §1)."""
    from stages.rewards import TrlExtras, combine, compute_rewards, invalid_rows, unscored_rows

    t0 = time.perf_counter()
    keys = list(zip(samples["prompt_id"], samples["sample_idx"]))
    texts, columns = reward_inputs(samples, prompts)
    extras = TrlExtras.at(*steps)
    components = compute_rewards(rewards, texts, samples["completion"].to_list(), keys, extras, **columns)
    t_reward = time.perf_counter() - t0

    valid = ~invalid_rows(components, keys, score_params.on_invalid, "prompt_id={pid} sample_idx={idx}",
                          "exclude such rows")
    score = combine(components, {r.name: r.weight for r in rewards})  # NaN where every reward returned None
    unscored = unscored_rows(components)
    if unscored.any():  # TRL 1.16 the same: left out of the baselines, advantage 0 (docs/design.md §1)
        log.warning("%d of %d completions got None from every reward: unscored (score and rlhf_reward null, left out "
                    "of their prompt's baseline, advantage 0)%s; make some reward apply to them",
                    int(unscored.sum()), samples.height, share_note())

    t1 = time.perf_counter()
    prompt_ids, completion_ids = completion_inputs(samples, tokenizer)
    pad = tokenizer.pad_token_id
    bs = batch_size or score_params.batch_size
    opts = dict(share=share_prompts, dtype=score_dtype(score_params.dtype), temperature=temperature)
    logp_ref = None
    if callable(logp_policy):  # a forward kept for the update: after the reference pass, whose memory is then free
        if ref is not policy:
            logp_ref, _ = sequence_logprobs(ref, prompt_ids, completion_ids, pad, bs, progress="logp ref", **opts)
        logp_policy = logp_policy()
    if logp_policy is None:
        logp_policy, _ = sequence_logprobs(policy, prompt_ids, completion_ids, pad, bs, progress="logp policy",
                                           min_batches=policy_batches, **opts)
    if ref is policy:
        logp_ref = list(logp_policy)
    elif logp_ref is None:
        logp_ref, _ = sequence_logprobs(ref, prompt_ids, completion_ids, pad, bs, progress="logp ref", **opts)
    t_logp = time.perf_counter() - t1

    _check_finite_logprobs(samples, logp_policy, "policy", "its weights are no longer finite numbers (a diverged "
                           "update): lower update.learning_rate and start over (python -m flows.train --restart)"
                           if ref is not policy else  # the first round's policy is the base model itself
                           "the model's weights are not finite numbers; check base.model_dir (or --policy)")
    _check_finite_logprobs(samples, logp_ref, "reference", "the reference model's weights are not finite numbers; "
                           "check score.ref_model (or base.model_dir)")
    num_tokens = samples["num_tokens"].to_numpy()
    truncated = (samples["finish_reason"] == "length").to_numpy()
    kl, rlhf = kl_and_reward(
        score, np.asarray(logp_policy), np.asarray(logp_ref), num_tokens, truncated,
        score_params.beta, score_params.kl_level, score_params.missing_eos_penalty,
    )
    out = samples.select("prompt_id", "sample_idx", "num_tokens", "finish_reason").with_columns(
        sample_digest(samples),
        _null_where("score", score, unscored),  # null: no reward applied
        # a component that returned None for a row (does not apply) is null there
        *[pl.Series(f"score/{n}", np.ma.filled(v, np.nan)).fill_nan(None) if np.ma.is_masked(v) else
          pl.Series(f"score/{n}", np.ma.getdata(v)) for n, v in components.items()],
        pl.Series("logp_policy", np.asarray(logp_policy, dtype=np.float64)),
        pl.Series("logp_ref", np.asarray(logp_ref, dtype=np.float64)),
        pl.Series("kl", kl),
        _null_where("rlhf_reward", rlhf, unscored),
        *[pl.Series(f"extra/{c}", v, strict=False) for c, v in extras.extra.items()],  # TRL's log_extra
    )
    dropped = int((~valid).sum())
    if dropped:
        log.warning("score.on_invalid=drop: %d of %d completions dropped (NaN/inf reward)%s", dropped, samples.height,
                    share_note())
        out = out.filter(pl.Series(valid))
    stats = score_stats(out, samples.height, list(components), t_reward, t_logp)
    # TRL's log_metric, under log/<name>: a user's name can never replace one of the round's own metrics
    return out, stats | {f"log/{name}": float(np.mean(v)) for name, v in extras.metrics.items() if v}


def _check_finite_logprobs(samples: pl.DataFrame, logp, whose: str, fix: str) -> None:
    """A NaN/inf logprob is the model's, not a reward's: stop here naming it (the advantage stage would otherwise
    report `rlhf_reward` NaN and advise fixing the rewards)."""
    values = np.asarray(logp, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise PipelineError(f"score: the {whose}'s logprob is {values[i]} for {bad.size} of {len(values)} completions "
                            f"(first prompt_id={samples['prompt_id'][i]} sample_idx={samples['sample_idx'][i]}): {fix}")


def _null_where(name: str, values: np.ndarray, mask: np.ndarray) -> pl.Series:
    """A float column, null where `mask` holds."""
    col = pl.Series(name, np.asarray(values, dtype=np.float64))
    return col.zip_with(pl.Series(~mask), pl.Series(name, [None] * len(col), dtype=pl.Float64))


def check_not_all_dropped(out: pl.DataFrame, rows_in: int) -> None:
    """A round (or stage input) of `rows_in` completions that `score.on_invalid: drop` left none of stops here with
    that cause: the advantages and the update would only say that their input is empty."""
    if rows_in and not out.height:
        raise PipelineError(f"score.on_invalid: drop dropped all {rows_in} completions (each had a NaN or inf "
                            "reward); nothing is left to train on: fix the reward functions in score.rewards, or set "
                            "score.on_invalid: error to stop at the first bad one with its name")


def optimizer_steps(params, round_index: int, total_rounds: int = 0) -> tuple[int, int]:
    """(optimizer steps before round `round_index` (0-based), of the whole run of `total_rounds` rounds, default
    train.rounds): TRL's trainer_state.global_step and max_steps, for rewards shaped by training progress."""
    up = params.update
    per_round = up.num_mini_batches * up.num_ppo_epochs
    return round_index * per_round, (total_rounds or params.train.rounds) * per_round


def score_stats(out: pl.DataFrame, rows_in: int, components: list[str], t_reward: float, t_logp: float) -> dict:
    """A scores table's statistics (TRL's names); from the whole round's table when it was scored over several ranks.
    Dropped rows (score.on_invalid: drop) are the input rows missing from `out`; unscored ones (null `score`: no
    reward applied) are counted and left out of the reward's statistics, as TRL leaves them out."""
    n = out.height
    score = out["score"].drop_nulls().to_numpy()  # unscored rows (no reward applied) are left out, as TRL does
    return {
        "reward": float(score.mean()) if len(score) else float("nan"),
        "reward_std": float(np.std(score, ddof=1)) if len(score) > 1 else 0.0,
        "score/unscored": out["score"].null_count(),
        "rlhf_reward": float("nan") if (m := out["rlhf_reward"].mean()) is None else float(m),  # None: no rows
        "kl": float(out["kl"].mean()) if n else float("nan"),
        "score/dropped": rows_in - n,
        "time/reward_s": t_reward,
        "time/logprobs_s": t_logp,
        # a component that never applied (all None) has no mean
        **{f"rewards/{c}": float(m) if (m := out[f"score/{c}"].mean()) is not None else float("nan") for c in components},
        **_trl_named(out, components),
    }


def _trl_named(out: pl.DataFrame, components: list[str]) -> dict:
    """The same round under the names TRL's RLOOTrainer (1.16) logs, for dashboards built on them: each reward's mean
    and std (`rewards/<name>/mean`, `/std`, over the rows it applied to, n - 1), the share of prompts whose completions'
    KL-penalised rewards (`rlhf_reward`, what the advantages come from) are all equal (`frac_reward_zero_std`: no
    learning signal from them; over prompts with >= 2 completions), and `kl/per_token`, TRL's `kl`: the log-ratio of
    the policy to the reference summed over the completion tokens and divided by their number (ours, `kl`, is per
    sequence, or per token and row with score.kl_level: token)."""
    def nan_if_none(v) -> float:
        return float("nan") if v is None else float(v)

    stats = {}
    for c in components:
        col = out[f"score/{c}"].drop_nulls()
        stats[f"rewards/{c}/mean"] = nan_if_none(col.mean())
        stats[f"rewards/{c}/std"] = nan_if_none(col.std(ddof=1))  # polars: None for fewer than 2 values
    groups = out.group_by("prompt_id").agg(pl.col("rlhf_reward").count().alias("n"), pl.col("rlhf_reward").std(ddof=1).alias("std"))
    groups = groups.filter(pl.col("n") > 1)
    # TRL's torch.isclose(std, 0): |std| <= 1e-8; polars' mean of no groups is None
    stats["frac_reward_zero_std"] = nan_if_none((groups["std"].abs() <= 1e-8).mean())
    tokens = out["num_tokens"].sum()  # 0 for no rows
    stats["kl/per_token"] = float((out["logp_policy"] - out["logp_ref"]).sum() / tokens) if tokens else float("nan")
    return stats


# The CLI below (arguments, file I/O) is tested end to end in subprocesses, which mutation testing cannot see;
# `make mutate` leaves it out (docs/design.md §10).
# pragma: no mutate block
def main(argv: list[str] | None = None) -> None:
    from stages.io import read_table, write_table
    from stages.models import load_causal_lm, load_tokenizer
    from stages.params import load_params
    from stages.rewards import build_rewards
    from stages.runtime import configure_env, setup_torch
    from stages.schemas import PROMPTS, SAMPLES

    parser = argparse.ArgumentParser(prog="python -m stages.score", description="Rewards, KL and rlhf_reward.")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", default=None, help="prompts table for raw prompts/extra columns")
    parser.add_argument("--policy", default=None, help="policy model dir (default: base.model_dir)")
    parser.add_argument("--ref", default=None, help="reference model dir (default: score.ref_model or base.model_dir)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    configure_env(params.base.threads)
    device = setup_torch(params.base.device, params.base.threads, params.base.seed)
    samples = read_table(args.samples, SAMPLES)
    prompts = read_table(args.prompts, PROMPTS) if args.prompts else None
    policy_dir = args.policy or params.base.model_dir
    ref_dir = args.ref or params.score.ref_model or params.base.model_dir
    # the error names where the dir came from: the flag, or the params field it defaulted to
    policy_field = "--policy" if args.policy else "base.model_dir"
    ref_field = "--ref" if args.ref else "score.ref_model" if params.score.ref_model else "base.model_dir"
    rewards = build_rewards(params.score.rewards, device=device, batch_size=params.score.batch_size)
    tokenizer = load_tokenizer(policy_dir, policy_field)
    policy = load_causal_lm(policy_dir, "float32", device, policy_field).eval()
    same = str(policy_dir) == str(ref_dir)
    ref = policy if same else load_causal_lm(ref_dir, "float32", device, ref_field).eval()
    try:
        if prompts is None:
            log.warning("no --prompts: reward functions get the chat-formatted prompt_text, no extra columns and no "
                        "conversation turns (training gives them the prompts table's); pass --prompts "
                        "data/prepared/train.parquet for the same rewards as training")
        round_index = int(samples["policy_version"].max() or 0) if samples.height else 0  # updates so far
        out, stats = score_samples(samples, rewards, policy, ref, tokenizer, params.score, prompts,
                                   share_prompts=params.base.share_prompts, steps=optimizer_steps(params, round_index),
                                   temperature=params.sample.temperature)
    except PipelineError as exc:
        from stages.rewards import MISSING_COLUMN

        if args.prompts is None and MISSING_COLUMN in str(exc):  # the columns come from the prompts table
            raise PipelineError(f"{exc}; here: pass the prompts table the samples came from with --prompts "
                                "(data/prepared/train.parquet, or eval.parquet for held-out samples)") from None
        raise
    check_not_all_dropped(out, samples.height)
    write_table(out, args.out, SCORES)
    log.info("wrote %s: reward %.3f, kl %.4f, %d rows", args.out, stats["reward"], stats["kl"], out.height)


if __name__ == "__main__":
    run_cli(main)
