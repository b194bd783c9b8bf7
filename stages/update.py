"""update: the REINFORCE (RLOO) policy step, optimizer state carried across rounds, checkpoints.

Reads  the round's `samples.parquet` and `advantages.parquet` (joined on the keys; samples without an
       advantage, e.g. dropped as invalid, are not trained on) and the policy (a checkpoint dir or the base).
Writes a checkpoint dir (`train.checkpoint_dir`): the policy as a normal model directory (safetensors +
       tokenizer, what vLLM reloads) plus `trainer_state.pt` (optimizer, scheduler, RNG states, round).

Loss (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, eq. 6; TRL RLOOTrainer for the options):
- `loss_aggregation: sequence` (paper): `loss = -mean_i( A_i * ratio_i )` with the sequence ratio
  `ratio_i = exp(sum_t logp_t - sum_t logp_old_t)`; its gradient at ratio = 1 is exactly the REINFORCE
  gradient `-mean_i(A_i * grad sum_t log pi(y_t|x, y_<t))`.
- `token`: per-token ratios, `loss = -sum_{i,t}(A_i * ratio_it) / num_tokens`.
- With several epochs or mini-batches the PPO-style clip applies:
  `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)` (eps = `cliprange`). The "old" logprobs come from
  the trainer itself under no_grad before the first step (as TRL does; bf16 sampler logprobs are too far
  off for ratios, DESIGN.md §7). With one epoch and one mini-batch the ratio is exactly 1 and the clip
  never binds, so the step is the plain REINFORCE step.
AdamW, warm-up + constant/linear/cosine schedule, gradient clipping, mini-batches x gradient
accumulation, bf16 autocast where bf16 is native (fp32 master weights), LoRA through peft.

Run: `python -m stages.update --samples S.parquet --advantages A.parquet [--policy DIR] [--out DIR]`
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import time
from pathlib import Path

import polars as pl
import torch

from stages.errors import PipelineError, run_cli
from stages.logprobs import token_logprobs

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


# ---------------------------------------------------------------- pure math


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
    """Samples joined with their advantages; every advantage row must have its sample."""
    keys = ["prompt_id", "sample_idx"]
    joined = advantages.select(*keys, "advantage").join(
        samples.select(*keys, "prompt_text", "completion_token_ids"), on=keys, how="left", maintain_order="left"
    )
    missing = joined.filter(pl.col("prompt_text").is_null())
    if missing.height:
        pid, k = missing.row(0)[:2]
        raise PipelineError(
            f"advantages: prompt_id={pid} sample_idx={k} has no matching sample ({missing.height} rows); "
            "use the samples file of the same round"
        )
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


# ---------------------------------------------------------------- the trainer


class Trainer:
    """The policy, its optimizer and scheduler, alive across rounds (in the flow) or one step (CLI)."""

    def __init__(self, model_dir: str, params, device, total_rounds: int | None = None):
        from stages.models import load_causal_lm, load_tokenizer
        from stages.runtime import fast_bf16

        self.params = params
        self.up = params.update
        self.device = device
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, "float32", device)
        self.model.config.use_cache = False
        if self.up.use_lora:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=self.up.lora_r, lora_alpha=self.up.lora_alpha, lora_dropout=self.up.lora_dropout,
                target_modules=list(self.up.lora_target_modules), task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(self.model, cfg)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.up.learning_rate, betas=(self.up.adam_beta1, self.up.adam_beta2),
            weight_decay=self.up.weight_decay,
        )
        rounds = total_rounds or params.train.rounds
        total_steps = rounds * self.up.num_ppo_epochs * self.up.num_mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.up.warmup_steps, total_steps, self.up.lr_scheduler)
        )
        self.autocast = self.up.bf16_autocast and fast_bf16()
        self.round = 0  # completed updates
        self.base_id = base_identity(self.model)

    # -- weights for the sampler
    def state_dict_for_sampler(self) -> dict[str, torch.Tensor]:
        """Full weights under the base model's parameter names; for LoRA, W + delta computed out of place
        (merge/unmerge in place would drift the frozen base weights by an ulp per call)."""
        if not self.up.use_lora:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        from peft.tuners.lora import LoraLayer

        base = self.model.get_base_model()
        sd = {k.replace(".base_layer", ""): v.detach() for k, v in base.state_dict().items() if "lora_" not in k}
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, LoraLayer):
                    for adapter in module.active_adapters:
                        sd[f"{name}.weight"] = sd[f"{name}.weight"] + module.get_delta_weight(adapter)
        return sd

    def _ctx(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logp(self, prompts, completions, with_entropy=False):
        with self._ctx():
            return token_logprobs(self.model, prompts, completions, self.tokenizer.pad_token_id, with_entropy)

    def step(self, batch: pl.DataFrame) -> dict:
        """One round of updates on a `training_batch`: epochs x mini-batches x accumulation."""
        up = self.up
        t0 = time.perf_counter()
        from stages.score import completion_inputs

        prompts, completions = completion_inputs(batch, self.tokenizer)
        adv = torch.tensor(batch["advantage"].to_list(), dtype=torch.float32, device=self.device)
        n = len(prompts)
        mb = math.ceil(n / up.num_mini_batches)
        micro = math.ceil(mb / up.gradient_accumulation_steps)
        if up.micro_batch_size:
            micro = min(micro, up.micro_batch_size)
        need_old = up.num_ppo_epochs > 1 or up.num_mini_batches > 1
        old: list[torch.Tensor] | None = None
        if need_old:
            with torch.no_grad():
                old = []
                for s in range(0, n, micro):
                    lp, _, _ = self._logp(prompts[s : s + micro], completions[s : s + micro])
                    old.extend(lp.float())
        stats = {"loss": [], "grad_norm": [], "clip_frac": [], "entropy": [], "approx_kl": []}
        pids = batch["prompt_id"].to_list()
        gv_stats: list[dict] = []
        tokens = 0
        order = list(range(n))
        for epoch in range(up.num_ppo_epochs):
            if epoch:
                random.Random(self.params.base.seed + self.round * 1000 + epoch).shuffle(order)
            for m0 in range(0, n, mb):
                mini = order[m0 : m0 + mb]
                self.optimizer.zero_grad(set_to_none=True)
                # token aggregation: each micro-batch's token mean is re-weighted by its share of the tokens
                mini_tokens = max(1, sum(len(completions[i]) for i in mini))
                gv = _GradVariance(self.model) if up.grad_variance else None
                for idx in _micro_batches(mini, micro, pids if gv else None):
                    logp, mask, ent = self._logp([prompts[i] for i in idx], [completions[i] for i in idx], True)
                    if old is None:
                        old_lp = logp.detach()
                    else:
                        width = logp.shape[1]
                        old_lp = torch.stack([torch.nn.functional.pad(old[i], (0, width - old[i].shape[0]))[:width] for i in idx])
                    loss, clip = policy_loss(logp, old_lp, mask, adv[idx], up.cliprange, up.loss_aggregation)
                    if not torch.isfinite(loss):
                        raise PipelineError(
                            f"update: loss is {loss.item()} at round {self.round + 1}; no step taken, the previous "
                            "checkpoint is intact; lower update.learning_rate or check the rewards for huge values"
                        )
                    share = mask.sum().item() / mini_tokens if up.loss_aggregation == "token" else len(idx) / len(mini)
                    (loss * share).backward()
                    if gv is not None:
                        gv.add(share)
                    tokens += int(mask.sum())
                    stats["loss"].append(loss.item())
                    stats["clip_frac"].append(clip.item())
                    stats["entropy"].append(float(ent.sum() / mask.sum().clamp(min=1)))
                    stats["approx_kl"].append(float(0.5 * ((logp.detach() - old_lp) ** 2 * mask).sum() / mask.sum().clamp(min=1)))
                params = [p for p in self.model.parameters() if p.requires_grad]
                if gv is not None:
                    gv_stats.append(gv.finish())
                if up.max_grad_norm > 0:
                    gn = torch.nn.utils.clip_grad_norm_(params, up.max_grad_norm)
                else:
                    gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                if not torch.isfinite(gn):
                    raise PipelineError(f"update: gradient norm is {gn.item()} at round {self.round + 1}; no step taken; lower update.learning_rate")
                stats["grad_norm"].append(float(gn))
                lr_used = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
        self.round += 1
        seconds = time.perf_counter() - t0
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
        grad_var = {}
        if gv_stats and all(g for g in gv_stats):
            grad_var = {k: mean([g[k] for g in gv_stats]) for k in gv_stats[0]}
        return grad_var | {
            "loss": mean(stats["loss"]),
            "grad_norm": mean(stats["grad_norm"]),
            "entropy": mean(stats["entropy"]),
            "clip_ratio": mean(stats["clip_frac"]),
            "policy/approx_kl": mean(stats["approx_kl"]),
            "learning_rate": lr_used,
            "time/update_s": seconds,
            "update/tokens_per_s": tokens / max(seconds, 1e-9),  # trained tokens (all epochs) per second
        }

    # -- checkpoints
    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def save(self, out_dir: str | Path, extra: dict | None = None, rng: dict | None = None) -> Path:
        """Atomically write the policy (merged) + tokenizer + trainer state to `out_dir`.

        `rng`: the RNG state to record (default: now); the flow passes the one it took when the round ended,
        as it writes the checkpoint from a background thread (see flows.train.RoundWriter)."""
        import shutil

        from stages.runtime import replace_dir, staging_dir

        out_dir = Path(out_dir)
        tmp = staging_dir(out_dir)
        try:
            if self.up.use_lora:
                self.model.save_pretrained(tmp / "adapter")
                # the merged weights make a normal model directory that vLLM and transformers load
                self.model.get_base_model().save_pretrained(tmp, state_dict=self.state_dict_for_sampler())
            else:
                self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            state = {
                "round": self.round,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng or self.rng_state(),
                "base_id": self.base_id,
                "lora": self.up.use_lora,
                "extra": extra or {},
            }
            if self.up.use_lora:
                state["adapter"] = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
            torch.save(state, tmp / STATE_FILE)
            for f in tmp.rglob("*"):
                if f.is_file():
                    f.chmod(0o644)
            replace_dir(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir

    def load_state(self, ckpt_dir: str | Path) -> dict:
        """Restore weights (LoRA adapter), optimizer, scheduler, RNG and round from a checkpoint."""
        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / STATE_FILE
        if not path.is_file():
            raise PipelineError(f"{ckpt_dir}: not a policy checkpoint (no {STATE_FILE}); delete it or point to a complete one")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise PipelineError(f"{path}: corrupt checkpoint ({type(exc).__name__}); delete {ckpt_dir} to start over") from None
        if state.get("base_id") != self.base_id:
            raise PipelineError(
                f"{ckpt_dir}: checkpoint is from a different base model ({state.get('base_id')} vs {self.base_id}); "
                "point train.checkpoint_dir elsewhere or delete it"
            )
        if state.get("lora") != self.up.use_lora:
            raise PipelineError(f"{ckpt_dir}: checkpoint has update.use_lora={state.get('lora')}; set it back or start over")
        if self.up.use_lora:
            self.model.load_state_dict(state["adapter"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        self.round = state["round"]
        return state.get("extra", {})


def base_identity(model) -> str:
    """Architecture fingerprint: model type, sizes and vocab (a checkpoint must match its base)."""
    cfg = getattr(model, "config", model)
    if hasattr(model, "get_base_model"):
        cfg = model.get_base_model().config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    return ":".join(str(getattr(cfg, k, None)) for k in keys)


def load_trainer(params, device, resume_from: str | Path | None = None, total_rounds: int | None = None) -> tuple[Trainer, dict]:
    """A trainer on the base model, or restored from `resume_from` (weights from the checkpoint dir)."""
    has_checkpoint = resume_from is not None and Path(resume_from, STATE_FILE).is_file()
    if has_checkpoint and not params.update.use_lora:
        # full fine-tuning: the weights are the checkpoint dir itself
        trainer = Trainer(str(resume_from), params, device, total_rounds)
        from stages.models import load_config

        trainer.base_id = base_identity(load_config(params.base.model_dir))
        return trainer, trainer.load_state(resume_from)
    trainer = Trainer(params.base.model_dir, params, device, total_rounds)
    extra = trainer.load_state(resume_from) if has_checkpoint else {}
    return trainer, extra


def main(argv: list[str] | None = None) -> None:
    from stages.io import read_table
    from stages.params import load_params
    from stages.runtime import configure_env, setup_torch
    from stages.schemas import ADVANTAGES, SAMPLES

    parser = argparse.ArgumentParser(prog="python -m stages.update", description="One RLOO policy update.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--advantages", required=True)
    parser.add_argument("--policy", default=None, help="checkpoint to continue from (default: base.model_dir)")
    parser.add_argument("--out", default=None, help="checkpoint dir to write (default: train.checkpoint_dir)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    configure_env(params.base.threads)
    device = setup_torch(params.base.device, params.base.threads, params.base.seed)
    batch = training_batch(read_table(args.samples, SAMPLES), read_table(args.advantages, ADVANTAGES))
    trainer, _ = load_trainer(params, device, args.policy)
    stats = trainer.step(batch)
    out = trainer.save(args.out or params.train.checkpoint_dir)
    log.info("update: loss %.4f, grad_norm %.3f, entropy %.3f -> %s", stats["loss"], stats["grad_norm"], stats["entropy"], out)


if __name__ == "__main__":
    run_cli(main)
