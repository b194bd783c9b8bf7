"""The advantage estimators, in one table (docs/design.md §4): adding one is one entry here plus its test.

Each `Estimator` says what its baseline is, in one line (its `summary`; README's table of estimators is written by hand),
whether the baseline comes from the prompt's own group (then it needs `sample.k >= 2`, and params reject
k = 1 with a hint naming the others), and builds the polars expressions of one round. `r` is the row's
`rlhf_reward`, a group is the completions of one prompt (`prompt_id`), n its size:

- `rloo` (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, eq. 6): `b_i = (sum_j r_j - r_i) / (n - 1)`,
  so `A_i = n/(n-1) (r_i - mean r)`; a group of one gets b = r (advantage 0) and is counted.
- `reinforce`: b = 0.
- `batch_mean`: the mean reward of the round.
- `moving_average`: the mean of every reward so far, this round included (or of the last `window` rounds).
- `ema`: `b <- alpha * b + (1 - alpha) * mean(this round)`, started at the first round's mean.
- `grpo` (Shao et al. 2024, https://arxiv.org/abs/2402.03300): `(r - mean) / (std + epsilon)` per group, std
  unbiased (n - 1, as torch/TRL); `baseline` holds the group mean; a group of one gets advantage 0.

Nothing here imports the params module (the params module imports this table to derive the allowed names).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl


@dataclass(frozen=True)
class RoundContext:
    """What an estimator may read for one round: the reward column, the group key, its params, and the
    carried state *after* this round was added (`ema`, `round_sums`, `round_counts`, `round_means`)."""

    reward: pl.Expr
    group: str
    params: Any  # AdvantageParams: an estimator reads only the fields it names in `Estimator.reads`
    state: dict[str, Any]


Exprs = tuple[pl.Expr, pl.Expr | None]  # (baseline, advantage or None = reward - baseline)


@dataclass(frozen=True)
class Estimator:
    name: str
    summary: str  # one line: the baseline of completion k
    group: bool  # the baseline comes from the prompt's own completions: needs k >= 2
    exprs: Callable[[RoundContext], Exprs]
    reads: tuple[str, ...] = ()  # the `advantage` fields it uses: only these count in the run identity with it


def _rloo(c: RoundContext) -> Exprs:
    r, n = c.reward, pl.len().over(c.group)
    # n == 1 would be 0/0: the `otherwise` branch gives the row its own reward (advantage 0).
    return pl.when(n > 1).then((r.sum().over(c.group) - r) / (n - 1)).otherwise(r), None


def _moving_average(c: RoundContext) -> Exprs:
    w = c.params.window or len(c.state["round_sums"])
    return pl.lit(math.fsum(c.state["round_sums"][-w:]) / sum(c.state["round_counts"][-w:])), None


def _grpo(c: RoundContext) -> Exprs:
    r, n = c.reward, pl.len().over(c.group)
    mean = r.mean().over(c.group)
    std = (((r - mean) ** 2).sum().over(c.group) / (n - 1).clip(lower_bound=1)).sqrt()  # two-pass, unbiased
    return mean, pl.when(n > 1).then((r - mean) / (std + c.params.epsilon)).otherwise(0.0)


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in [
        Estimator("rloo", "leave-one-out: (sum_i r_i - r_k) / (n - 1) over the prompt's n completions", True, _rloo),
        Estimator("reinforce", "none: 0", False, lambda c: (pl.lit(0.0), None)),
        Estimator("batch_mean", "mean reward of the round", False, lambda c: (c.reward.mean(), None)),
        Estimator("moving_average", "mean of every reward so far (or of the last `window` rounds), this round included",
                  False, _moving_average, reads=("window",)),
        Estimator("ema", "b <- alpha * b + (1 - alpha) * mean(this round), started at the first round's mean", False,
                  lambda c: (pl.lit(c.state["ema"]), None), reads=("alpha",)),
        Estimator("grpo", "group mean; the advantage is divided by the group std (unbiased) + epsilon", True, _grpo, reads=("epsilon",)),
    ]
}
GROUP_ESTIMATORS = tuple(n for n, e in ESTIMATORS.items() if e.group)
OTHER_ESTIMATORS = tuple(n for n, e in ESTIMATORS.items() if not e.group)
