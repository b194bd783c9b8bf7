"""advantage: a baseline per completion and `advantage = rlhf_reward - baseline`.

Reads  a scores table (`prompt_id`, `sample_idx`, `rlhf_reward`; other columns are ignored).
Writes `advantages.parquet` (schema `ADVANTAGES`): the keys, `rlhf_reward`, `baseline`, `advantage`
       (float64) and `estimator`, the same rows in the same order as the input.

Estimators (`advantage.estimator`): the table in `stages.estimators` (rloo, the default, and the classic
baselines reinforce, batch_mean, moving_average, ema, plus grpo), each documented there. Leave-one-out is
implemented twice and kept equal: in polars (`loo_baseline` / `rloo_polars`, what the stage writes, through the
table's `rloo` entry) and in torch (`rloo_torch` / `rloo_torch_grouped`); the tests hold them equal to a loop.
Groups may have unequal sizes (rows dropped as invalid upstream): each uses its own n.
A row whose `rlhf_reward` is null is unscored (every reward returned None for it): as in TRL 1.16's RLOOTrainer it
is left out of every baseline, mean and whitening, and gets advantage 0 (its `baseline` null).
`normalize_advantages` whitens over the batch afterwards: `(A - mean(A)) / (std(A) + 1e-4)`, std
unbiased, TRL's constant (1e-8 before 2026-12-07 blew float noise of a constant batch up to unit advantages);
`baseline` is left as is. Every std is two-pass, sqrt(sum((x - mean)^2) / (n - ddof)),
never E[x^2] - mean^2 (catastrophic cancellation when |mean| >> std).

State: `moving_average` and `ema` carry a small JSON-able dict from round to round (`round_sums`,
`round_counts`, `round_means`, `ema`); it is updated for every estimator, so the caller can always
persist it (the training flow in each round's manifest, the CLI with `--state-in/--state-out`).

Run: `python -m stages.advantage --scores scores.parquet --out advantages.parquet
      [--estimator rloo] [--params params.yaml] [--state-in state.json] [--state-out state.json]`
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from stages.errors import PipelineError, run_cli
from stages.estimators import ESTIMATORS, GROUP_ESTIMATORS, OTHER_ESTIMATORS, RoundContext
from stages.io import read_json, read_table, write_json, write_table
from stages.params import DEFAULT_PARAMS, AdvantageParams, load_params
from stages.schemas import ADVANTAGES, DIGEST, check

if TYPE_CHECKING:  # torch is imported where used: the CLI writes from polars and starts 3 s faster without it
    import torch

log = logging.getLogger(__name__)

KEYS = ["prompt_id", "sample_idx"]
REWARD = "rlhf_reward"
INPUT: dict[str, Any] = {"prompt_id": pl.String, "sample_idx": pl.Int32, REWARD: pl.Float64}
WHITEN_EPS = 1e-4  # TRL 1.16's


# ---------------------------------------------------------------- leave-one-out, twice (pure)


def loo_baseline(reward: str = REWARD, group: str = "prompt_id") -> pl.Expr:
    """Leave-one-out baseline per row; a group of one gets its own reward (advantage 0). The table's `rloo`."""
    return ESTIMATORS["rloo"].exprs(RoundContext(pl.col(reward), group, None, {}))[0]


def rloo_polars(df: pl.DataFrame, reward: str = REWARD, group: str = "prompt_id") -> pl.DataFrame:
    """`df` with `baseline` and `advantage` added; lazy, so both windows share one group-by (3x faster)."""
    lf = df.lazy().with_columns(baseline=loo_baseline(reward, group))
    return lf.with_columns(advantage=pl.col(reward) - pl.col("baseline")).collect()


def rloo_torch(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_prompts, K) rewards -> (baseline, advantage), both (num_prompts, K).

    `mask` (num_prompts, K) bool marks real samples in a padded tensor (unequal group sizes); padded
    slots get baseline and advantage 0.
    """
    import torch

    if mask is None:
        k = rewards.shape[1]
        if k < 2:  # K = 1: no other sample; baseline = own reward
            return rewards.clone(), torch.zeros_like(rewards)
        baseline = torch.sub(rewards.sum(dim=1, keepdim=True), rewards).div_(k - 1)  # (P, K)
        return baseline, rewards - baseline
    r = rewards.masked_fill(~mask, 0)
    n = mask.sum(dim=1, keepdim=True)  # (P, 1)
    loo = (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1)
    baseline = torch.where(n > 1, loo, r).masked_fill_(~mask, 0)
    return baseline, r - baseline


def rloo_torch_grouped(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (N,) rewards and (N,) int64 group ids 0..G-1 (any order, any sizes) -> (baseline, advantage)."""
    import torch

    num_groups = int(group.max()) + 1
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, rewards)
    n = torch.bincount(group, minlength=num_groups)[group]  # (N,) size of each row's group
    loo = (sums[group] - rewards) / (n - 1).clamp(min=1)
    baseline = torch.where(n > 1, loo, rewards)
    return baseline, rewards - baseline


# ---------------------------------------------------------------- estimators (pure)


def _std(x: pl.Expr, ddof: int = 1) -> pl.Expr:
    """Two-pass std over the whole column; 0 when there are fewer than ddof + 1 values."""
    return (((x - x.mean()) ** 2).sum() / (x.count() - ddof).clip(lower_bound=1)).sqrt()


def new_state() -> dict[str, Any]:
    return {"estimator": None, "ema": None, "round_sums": [], "round_counts": [], "round_means": []}


def check_state(state: Any, source: str = "state") -> dict[str, Any]:
    """Validate a carried state dict (None = first round); one-line PipelineError when malformed."""
    if state is None:
        return new_state()
    fix = "pass the state written by the previous round (--state-out) or none to start afresh"
    lists = ("round_sums", "round_counts", "round_means")
    if not isinstance(state, dict) or any(not isinstance(state.get(k), list) for k in lists):
        raise PipelineError(f"{source}: not an advantage state (needs lists {list(lists)}); {fix}")
    if len({len(state[k]) for k in lists}) != 1 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in state["round_counts"]):
        raise PipelineError(f"{source}: round_sums/round_counts/round_means disagree; {fix}")
    for key in ("round_sums", "round_means"):
        bad = [v for v in state[key] if not _finite_number(v)]
        if bad:
            raise PipelineError(f"{source}: `{key}` must hold finite numbers, got {bad[0]!r}; {fix}")
    if state.get("ema") is not None and not _finite_number(state["ema"]):
        raise PipelineError(f"{source}: `ema` must be a finite number or null, got {state['ema']!r}; {fix}")
    return {**new_state(), **state}


def _finite_number(v: Any) -> bool:
    """An int or float, not a bool (JSON's true is no baseline), and not NaN/inf (it would make every advantage NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_scores(df: pl.DataFrame, estimator: str, source: str = "scores",
                    singletons_ok: bool = False) -> pl.DataFrame:
    """Raise PipelineError (one line) for input the estimators cannot handle; return the group sizes. A group
    estimator refuses a table whose every prompt has one completion (k = 1: no baseline), unless `singletons_ok`
    (the flow's rounds, sampled with k >= 2 and thinned by `score.on_invalid: drop`: each then gets advantage 0).

    The one group-by (`prompt_id` -> rows `n`, distinct `sample_idx` `u`) finds duplicates (u < n) 3x
    faster than hashing both key columns, and its sizes feed the stats.
    """
    problem = check(df.schema, INPUT, source)
    if problem:
        raise PipelineError(problem)
    if df.height == 0:
        raise PipelineError(f"{source}: no rows; run the score stage first or pass a non-empty scores table")
    keys = df.select(KEYS)
    null_key = keys.filter(pl.any_horizontal(pl.all().is_null()))
    if null_key.height:
        raise PipelineError(f"{source}: null key in row {null_key.row(0)}; every row needs prompt_id and sample_idx")
    bad = df.filter(~pl.col(REWARD).is_finite().fill_null(True))  # null: unscored, not bad
    if bad.height:
        pid, idx, val = bad.select(*KEYS, REWARD).row(0)
        raise PipelineError(
            f"{source}: column `{REWARD}` is {val} at prompt_id={pid!r} sample_idx={idx} "
            f"({bad.height} row(s) NaN/inf); fix the rewards or set score.on_invalid: drop"
        )
    sizes = df.group_by("prompt_id").agg(n=pl.len(), u=pl.col("sample_idx").n_unique(), scored=pl.col(REWARD).count())
    if (sizes["u"] < sizes["n"]).any():
        pid, idx = keys.filter(keys.is_duplicated()).row(0)  # the slow, exact search only on the error path
        raise PipelineError(f"{source}: duplicate (prompt_id, sample_idx) = ({pid!r}, {idx}); keys must be unique")
    # the input's k, not what unscored rows leave: a group they thin to one gets advantage 0, as in TRL
    if estimator in GROUP_ESTIMATORS and (sizes["n"] == 1).all() and not singletons_ok:
        raise PipelineError(
            f"{source}: every prompt has one completion (k < 2 for {estimator}, or the others dropped by "
            f"score.on_invalid: drop): the group baseline is undefined; sample k >= 2 per prompt or pick "
            f"{'|'.join(OTHER_ESTIMATORS)}"
        )
    return sizes.filter(pl.col("scored") > 0).select("prompt_id", n=pl.col("scored"))  # the baselines' groups


def compute_advantages(
    df: pl.DataFrame, params: AdvantageParams, state: dict[str, Any] | None = None, source: str = "scores",
    singletons_ok: bool = False,
) -> tuple[pl.DataFrame, dict[str, Any], dict[str, Any]]:
    """One round: (scores, params, carried state) -> (ADVANTAGES table, next state, stats). `singletons_ok`: see
    `validate_scores`."""
    est = params.estimator
    sizes = validate_scores(df, est, source, singletons_ok)
    state = check_state(state)
    digest = [DIGEST] if DIGEST in df.columns else []  # carried for the update's check (stages/schemas.py)
    df = df.select(*KEYS, pl.col(REWARD).cast(pl.Float64), *digest).with_row_index("_row")
    unscored = df.filter(pl.col(REWARD).is_null()).with_columns(  # TRL 1.16: in no baseline, advantage 0
        baseline=pl.lit(None, pl.Float64), advantage=pl.lit(0.0), estimator=pl.lit(est))
    if unscored.height:
        df = df.filter(pl.col(REWARD).is_not_null())
    r, g = pl.col(REWARD), "prompt_id"
    if not df.height:  # every row unscored: TRL's advantages are all 0, and the round adds nothing to the history
        log.warning("%s: every completion is unscored (no reward applied to any): advantage 0 for all %d",
                    source, unscored.height)
        nan = float("nan")
        stats = {"advantage_mean": 0.0, "advantage_std": 0.0, "baseline_mean": nan, "reward_mean": nan,
                 "reward_std": nan, "estimator": est, "rows": 0, "groups": 0, "singleton_groups": 0,
                 "normalized": params.normalize_advantages, "unscored": unscored.height}
        return unscored.select(*ADVANTAGES, *digest), {**state, "estimator": est}, stats

    round_sum, rows = float(df[REWARD].sum()), df.height
    round_mean = round_sum / rows
    ema = round_mean if state["ema"] is None else params.alpha * state["ema"] + (1 - params.alpha) * round_mean
    nxt = {
        "estimator": est,
        "ema": ema,
        "round_sums": [*state["round_sums"], round_sum],
        "round_counts": [*state["round_counts"], rows],
        "round_means": [*state["round_means"], round_mean],
    }

    baseline, advantage = ESTIMATORS[est].exprs(RoundContext(r, g, params, nxt))
    if advantage is None:
        advantage = r - pl.col("baseline")

    # Lazy: the windows over the same group share one group-by (see rloo_polars).
    lf = df.lazy().with_columns(baseline=baseline.cast(pl.Float64)).with_columns(advantage=advantage)
    if params.normalize_advantages:
        a = pl.col("advantage")
        if ESTIMATORS[est].group:  # a group of one has no baseline (TRL: NaN, left out of the whitening, then 0)
            alone = pl.len().over(g) == 1
            live = a.filter(~alone)
            lf = lf.with_columns(advantage=pl.when(alone).then(0.0).otherwise((a - live.mean()) / (_std(live) + WHITEN_EPS)))
        else:
            lf = lf.with_columns(advantage=(a - a.mean()) / (_std(a) + WHITEN_EPS))
    out = lf.with_columns(estimator=pl.lit(est)).select("_row", *ADVANTAGES, *digest).collect()

    stats = out.select(
        advantage_mean=pl.col("advantage").mean(),
        advantage_std=_std(pl.col("advantage")),
        baseline_mean=pl.col("baseline").mean(),
        reward_mean=r.mean(),
        reward_std=_std(r),
    ).row(0, named=True)
    stats |= {
        "estimator": est,
        "rows": rows,
        "groups": sizes.height,
        "singleton_groups": int((sizes["n"] == 1).sum()),
        "normalized": params.normalize_advantages,
        "unscored": unscored.height,
    }
    if unscored.height:  # back in the input's order
        out = pl.concat([out, unscored.select(out.columns)]).sort("_row")
    return out.drop("_row"), nxt, stats


# ---------------------------------------------------------------- CLI


def resolve_params(params_path: str | None, estimator: str | None) -> AdvantageParams:
    """`advantage` section of the params file; AdvantageParams defaults when the default file is absent."""
    overrides = {"advantage.estimator": estimator} if estimator else None
    if params_path is None and not DEFAULT_PARAMS.is_file():
        log.info("no %s here: using the default advantage params", DEFAULT_PARAMS)
        return AdvantageParams(**({"estimator": estimator} if estimator else {}))
    return load_params(params_path or DEFAULT_PARAMS, overrides).advantage


# The CLI below (arguments, file I/O) is tested end to end in subprocesses, which mutation testing cannot see;
# `make mutate` leaves it out (docs/design.md §10).
# pragma: no mutate block
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m stages.advantage", description=__doc__.splitlines()[0])
    ap.add_argument("--scores", required=True, help="scores Parquet (prompt_id, sample_idx, rlhf_reward)")
    ap.add_argument("--out", required=True, help="advantages Parquet to write (atomically)")
    ap.add_argument("--estimator", choices=list(ESTIMATORS), help="overrides advantage.estimator")
    ap.add_argument("--params", help=f"params file (default {DEFAULT_PARAMS}, when present)")
    ap.add_argument("--state-in", help="JSON state of the previous round (moving_average, ema)")
    ap.add_argument("--state-out", help="where to write this round's state as JSON")
    args = ap.parse_args(argv)

    params = resolve_params(args.params, args.estimator)
    state = check_state(read_json(args.state_in), args.state_in) if args.state_in else None
    scores = read_table(args.scores, INPUT)
    out, nxt, stats = compute_advantages(scores, params, state, source=str(args.scores))
    write_table(out, args.out, ADVANTAGES)
    if args.state_out:
        write_json(nxt, args.state_out)
    if stats["singleton_groups"] and params.estimator in GROUP_ESTIMATORS:
        log.warning("%d prompt(s) have a single completion: advantage 0", stats["singleton_groups"])
    log.info("wrote %s: %s", Path(args.out), ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in stats.items()))
    return stats


if __name__ == "__main__":
    run_cli(main)
