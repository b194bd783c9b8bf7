"""The update's math, apart from any model: the REINFORCE/RLOO loss with the PPO-style clip, the learning-rate
schedules, the training batch, micro-batching, and the policy-gradient variance across prompt groups.

Loss (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, eq. 6; TRL RLOOTrainer for the options):
- `sequence` (paper): `loss = -mean_i( A_i * ratio_i )`, `ratio_i = exp(sum_t logp_t - sum_t logp_old_t)`; its
  gradient at ratio = 1 is exactly the REINFORCE gradient `-mean_i(A_i * grad sum_t log pi(y_t|x, y_<t))`.
- `token`: per-token ratios, `loss = -sum_{i,t}(A_i * ratio_it) / num_tokens`.
- the PPO-style clip: `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`, binding only with several epochs or
  mini-batches (the ratio is exactly 1 otherwise).
"""

from __future__ import annotations

import math

import polars as pl
import torch

from stages.errors import PipelineError
from stages.schemas import DIGEST, sample_digest


def policy_loss(logp, old_logp, mask, advantages, cliprange: float, aggregation: str = "sequence"):
    """Clipped REINFORCE loss and the clip fraction. logp/old_logp/mask: (B, T); advantages: (B,)."""
    if aggregation == "sequence":
        log_ratio = ((logp - old_logp) * mask).sum(-1)  # (B,)
        ratio = torch.exp(log_ratio)
        unclipped = ratio * advantages
        clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * advantages
        loss = -torch.minimum(unclipped, clipped).mean()
        clip_frac = (clipped < unclipped).float().mean()
    else:
        ratio = torch.exp(logp - old_logp)  # (B, T)
        adv = advantages.unsqueeze(-1)
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * adv
        per_token = -torch.minimum(unclipped, clipped) * mask
        loss = per_token.sum() / mask.sum().clamp(min=1)
        clip_frac = ((clipped < unclipped) & mask).float().sum() / mask.sum().clamp(min=1)
    return loss, clip_frac.detach()


def lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return f


def training_batch(samples: pl.DataFrame, advantages: pl.DataFrame) -> pl.DataFrame:
    """Samples joined with their advantages; every advantage row must have its sample, and no key may repeat in
    either table (a repeated advantage row would train on its completion twice; a repeated sample, on one of two)."""
    keys = ["prompt_id", "sample_idx"]
    for name, table in (("advantages", advantages), ("samples", samples)):
        dup = table.select(keys).filter(table.select(keys).is_duplicated())
        if dup.height:
            pid, k = dup.row(0)
            raise PipelineError(f"{name}: prompt_id={pid} sample_idx={k} appears more than once ({dup.height} rows with "
                                f"a repeated key); each completion has one row: use the {name} file a stage wrote "
                                "for this round, not files joined or concatenated")
    digest = [DIGEST] if DIGEST in advantages.columns else []
    joined = advantages.select(*keys, "advantage", *digest).join(
        samples.select(*keys, "prompt_text", "completion_token_ids"), on=keys, how="left", maintain_order="left"
    )
    missing = joined.filter(pl.col("prompt_text").is_null())
    if missing.height:
        pid, k = missing.row(0)[:2]
        raise PipelineError(
            f"advantages: prompt_id={pid} sample_idx={k} has no matching sample ({missing.height} rows); "
            "use the samples file of the same round"
        )
    if digest:
        other = joined.filter(pl.col(DIGEST).is_not_null() & (pl.col(DIGEST) != sample_digest(joined)))
        if other.height:
            pid, k = other.row(0)[:2]
            raise PipelineError(
                f"advantages: prompt_id={pid} sample_idx={k} was scored on another completion than the samples "
                f"file's ({other.height} of {joined.height} rows; `{DIGEST}` differs): score and advantage the "
                "samples you train on, or use the samples file of the same round"
            )
        joined = joined.drop(DIGEST)
    return joined


def _micro_batches(mini: list[int], micro: int, prompt_ids: list[str] | None) -> list[list[int]]:
    """Micro-batches of at most `micro` rows; with `prompt_ids`, one prompt's group per micro-batch."""
    if prompt_ids is None:
        return [mini[u : u + micro] for u in range(0, len(mini), micro)]
    groups: dict[str, list[int]] = {}
    for i in mini:
        groups.setdefault(prompt_ids[i], []).append(i)
    return list(groups.values())


class _GradVariance:
    """Variance of the policy-gradient estimate across the prompt groups of one mini-batch.

    Each group m (one prompt, its K completions) contributes `c_m = w_m * g_m` to the accumulated gradient
    G = sum_m c_m, where g_m is the gradient of that group's own loss (an estimate of G from one prompt) and
    w_m its share of the loss. The trace of the covariance of g_m (unbiased, weighted) is
        var = (sum_m w_m ||g_m||^2 - ||G||^2) / (1 - sum_m w_m^2),
    measured before clipping, and the signal-to-noise ratio ||E g||^2 / var with ||E g||^2 estimated without bias
    by ||G||^2 - var * sum_m w_m^2. Costs one copy of the gradients; only `c_m`'s squared norm is kept.
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.prev = [torch.zeros_like(p) for p in self.params]
        self.weighted_sq = 0.0  # sum_m w_m ||g_m||^2 = sum_m ||c_m||^2 / w_m
        self.w_sq = 0.0
        self.n = 0

    @torch.no_grad()
    def add(self, share: float) -> None:
        sq = 0.0
        for p, prev in zip(self.params, self.prev):
            if p.grad is None:
                continue
            sq += float(((p.grad - prev) ** 2).sum())
            prev.copy_(p.grad)
        self.weighted_sq += sq / max(share, 1e-12)
        self.w_sq += share * share
        self.n += 1

    @torch.no_grad()
    def finish(self) -> dict:
        if self.n < 2:
            return {}
        total_sq = float(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))
        var = max(0.0, self.weighted_sq - total_sq) / max(1.0 - self.w_sq, 1e-12)
        signal = total_sq - var * self.w_sq  # unbiased: E||G||^2 = ||E g||^2 + sum_m w_m^2 tr Cov(g)
        return {
            "grad/variance": var,  # trace of the covariance of a one-prompt gradient estimate
            "grad/mean_sq_norm": total_sq,  # ||G||^2 of the mini-batch gradient
            "grad/signal": signal,  # estimate of ||E g||^2 (noisy, can be < 0)
            "grad/snr": signal / max(var, 1e-30),  # scale-free: unchanged when the advantages are rescaled
        }
