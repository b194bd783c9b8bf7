"""update: the REINFORCE (RLOO) policy step, optimizer state carried across rounds, checkpoints.

Reads  the round's `samples.parquet` and `advantages.parquet` (joined on the keys; samples without an
       advantage, e.g. dropped as invalid, are not trained on; a repeated key, or an advantage whose `sample_digest`
       is not its sample's, is refused) and the policy (a checkpoint dir or the base).
Writes a checkpoint (`train.checkpoint_dir`: the policy as a normal model directory, what vLLM reloads, and
       `train.state_dir`: optimizer, scheduler, RNG; the format is stages/checkpoint.py's).

Loss (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, eq. 6; TRL RLOOTrainer for the options):
- `loss_aggregation: sequence` (paper): `loss = -mean_i( A_i * ratio_i )` with the sequence ratio
  `ratio_i = exp(sum_t logp_t - sum_t logp_old_t)`; its gradient at ratio = 1 is exactly the REINFORCE
  gradient `-mean_i(A_i * grad sum_t log pi(y_t|x, y_<t))`.
- `token`: per-token ratios, `loss = -sum_{i,t}(A_i * ratio_it) / num_tokens`.
- With several epochs or mini-batches the PPO-style clip applies:
  `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)` (eps = `cliprange`). The "old" logprobs come from
  the trainer itself under no_grad before the first step (as TRL does; bf16 sampler logprobs are too far
  off for ratios, docs/design.md §7). With one epoch and one mini-batch the ratio is exactly 1 and the clip
  never binds, so the step is the plain REINFORCE step.
AdamW, warm-up + constant/linear/cosine schedule, gradient clipping, mini-batches x gradient
accumulation, bf16 autocast where bf16 is native (fp32 master weights), LoRA through peft.

Run: `python -m stages.update --samples S.parquet --advantages A.parquet [--policy DIR] [--out DIR] [--state-dir DIR]`
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import polars as pl
import torch

from stages.errors import PipelineError, restart_command, run_cli
from stages.logprobs import LogprobModel
from stages.runtime import micro_batch_size
from stages.loss import _GradVariance, _micro_batches, lr_lambda, policy_loss, training_batch  # noqa: F401

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the trainer


@dataclasses.dataclass
class _Ahead:
    """The update's forward of a round's rows, run at scoring time (`Trainer.forward_ahead`)."""

    rows: list[tuple]  # (prompt_id, sample_idx, prompt text, completion token ids) of each row, in order
    round: int  # the trainer's completed updates when it ran: the weights it saw
    logp: torch.Tensor
    mask: torch.Tensor
    ent: torch.Tensor

    @staticmethod
    def rows_of(batch: pl.DataFrame) -> list[tuple]:
        return list(zip(batch["prompt_id"], batch["sample_idx"], batch["prompt_text"],
                        map(tuple, batch["completion_token_ids"].to_list())))

    def serves(self, batch: pl.DataFrame, round: int) -> bool:
        """Whether this forward is the one `step` would run on `batch` now: its rows (their keys, prompts and
        completions: a prompt comes back in later rounds), in its order, at its weights."""
        return round == self.round and self.rows_of(batch) == self.rows


def check_ranks(params, nproc: int, per_node: bool = True) -> None:
    """What a run over `nproc` processes refuses, said by the launcher before any rank starts (`flows.train`) and by
    each rank's trainer: the update settings that need one process and, for the `nproc` processes of one node
    (`per_node`: the launcher's), the device (docs/design.md §8)."""
    if nproc <= 1:
        return
    up = params.update
    if up.grad_variance:
        raise PipelineError("update.grad_variance: measured in one process only (it needs every prompt's gradient); "
                            "turn it off or run with one process")
    if up.strategy == "fsdp" and up.use_lora:
        raise PipelineError("update.strategy: fsdp with update.use_lora is not supported; use ddp (the adapters "
                            "are small enough to replicate)")
    device = str(params.base.device)
    if per_node and device != "cpu":  # cuda, or auto (cuda where torch sees a GPU: init_distributed's choice)
        import torch

        if device == "auto" and not torch.cuda.is_available():
            return
        if not torch.cuda.is_available():
            raise PipelineError("base.device: cuda requested but torch sees no GPU; set base.device to auto or cpu")
        if nproc > torch.cuda.device_count():
            raise PipelineError(f"train.nproc_per_node: {nproc} processes, one per GPU, but torch sees "
                                f"{torch.cuda.device_count()} GPU(s); lower it (or RLOO_NPROC_PER_NODE)")


class Trainer:
    """The policy, its optimizer and scheduler, alive across rounds (in the flow) or one step (CLI)."""

    def __init__(self, model_dir: str, params, device, total_rounds: int | None = None, field: str = "base.model_dir",
                 dist=None):
        from stages.loop.dist import SINGLE
        from stages.models import disable_dropout, load_causal_lm, load_tokenizer, own_memory
        from stages.runtime import update_autocast

        self.params = params
        self.up = params.update
        self.device = device
        self.dist = dist or SINGLE
        self.tokenizer = load_tokenizer(model_dir, field)
        self.model = load_causal_lm(model_dir, "float32", device, field)
        self.model.config.use_cache = False  # before disable_dropout, whose config copies keep what is set by then
        if disable_dropout(self.model):  # before LoRA: update.lora_dropout stays as set
            log.info("update: the policy's dropout is off (as TRL's disable_dropout)")
        if not self.up.use_lora:  # LoRA never writes the base weights: the file's pages can stay
            own_memory(self.model)  # not the file's copy-on-write pages: the first optimizer step would fault them in
        if self.up.use_lora:
            from peft import LoraConfig, get_peft_model

            if self.up.lora_dropout:  # applied as set, unlike TRL's disable_dropout (docs/design.md §7)
                log.warning("update.lora_dropout %g: the update's logprobs are a noisy copy of the policy the engine "
                            "samples and the KL is measured on (TRL's disable_dropout zeroes it); set it to 0 unless "
                            "you mean it", self.up.lora_dropout)

            cfg = LoraConfig(
                r=self.up.lora_r, lora_alpha=self.up.lora_alpha, lora_dropout=self.up.lora_dropout,
                target_modules=list(self.up.lora_target_modules), task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(self.model, cfg)
        if self.up.fused_layers:  # after peft: a LoRA-wrapped projection is not fused (its module runs as it is)
            from stages.fused import fuse_layers

            # on the CPU the MLPs keep their bf16 weight casts from the forward for the backward (a cast is a pass
            # over memory there; on a GPU it is not worth the memory); FSDP's per-layer whole weights are not kept
            keep = device.type == "cpu" and not (self.dist.enabled and self.up.strategy == "fsdp")
            fused = fuse_layers(self.model, keep_casts=keep)
            log.debug("update.fused_layers: %d norm/MLP modules with the lean-memory backward", fused)
        self.model.train()
        self.autocast = update_autocast(self.up.bf16_autocast)
        self.micro_cap = micro_batch_size(self.up.micro_batch_size, self.autocast)  # `auto` resolved once, here
        lm = LogprobModel(self.model, self.tokenizer.pad_token_id, params.base.share_prompts,
                          "bfloat16" if self.autocast else "float32", params.sample.temperature)
        self.forward_model = self._wrap(lm)  # DDP / FSDP over the ranks; the LogprobModel itself in one process
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # fused AdamW: one kernel over all parameters, 10x faster than the foreach one on this CPU (0.07 vs 0.70 s per
        # step for 135M parameters, measured); the same update. FSDP's sharded parameters take the foreach one.
        fused = not (self.dist.enabled and self.up.strategy == "fsdp")
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.up.learning_rate, betas=(self.up.adam_beta1, self.up.adam_beta2),
            weight_decay=self.up.weight_decay, **({"fused": True} if fused else {}),
        )
        rounds = total_rounds or params.train.rounds
        total_steps = rounds * self.up.num_ppo_epochs * self.up.num_mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.up.warmup_steps, total_steps, self.up.lr_scheduler)
        )
        self.round = 0  # completed updates
        self.base_id = base_identity(self.model)
        self._ahead: _Ahead | None = None  # the update's forward run at scoring time (`forward_ahead`)

    def _wrap(self, lm: LogprobModel):
        """DDP (replicated weights, gradients all-reduced) or FSDP2 (`fully_shard`: weights, gradients and optimizer
        state sharded over the ranks) when there are several ranks (docs/design.md §8)."""
        self._fsdp = None
        if not self.dist.enabled:
            return lm
        check_ranks(self.params, self.dist.world_size, per_node=False)
        if self.up.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.model.layers:
                fully_shard(layer)
            self._fsdp = fully_shard(self.model)
            return lm
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(lm, device_ids=ids)

    # -- weights for the sampler
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict on this rank (FSDP: gathered from the shards; every rank takes part)."""
        if self.up.strategy == "fsdp" and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return self.model.state_dict()

    def state_dict_for_sampler(self) -> dict[str, torch.Tensor]:
        """Full weights under the base model's parameter names; for LoRA, W + delta computed out of place
        (merge/unmerge in place would drift the frozen base weights by an ulp per call)."""
        if not self.up.use_lora:
            return {k: v.detach() for k, v in self.full_state_dict().items()}
        from peft.tuners.lora import LoraLayer

        base = self.model.get_base_model()
        sd = {k.replace(".base_layer", ""): v.detach() for k, v in base.state_dict().items() if "lora_" not in k}
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, LoraLayer):
                    for adapter in module.active_adapters:
                        sd[f"{name}.weight"] = sd[f"{name}.weight"] + module.get_delta_weight(adapter)
        return sd

    def _logp(self, prompts, completions, with_entropy=False, sync: bool = True):
        with self._sync(sync) if hasattr(self.forward_model, "no_sync") else contextlib.nullcontext():
            return self.forward_model(prompts, completions, with_entropy)

    def step(self, batch: pl.DataFrame, dist=None) -> dict:
        """One round of updates on a `training_batch`: epochs x mini-batches x accumulation.

        With several ranks (`dist`), `batch` is this rank's rows; each mini-batch's loss is normalised by the rows (or
        tokens) of that mini-batch over all ranks, so DDP's gradient average equals one process's gradient on the
        whole round (docs/design.md §8)."""
        from stages.loop.dist import SINGLE
        from stages.score import completion_inputs

        up, dist = self.up, dist or SINGLE
        t0 = time.perf_counter()
        prompts, completions = completion_inputs(batch, self.tokenizer)
        adv = torch.tensor(batch["advantage"].to_list(), dtype=torch.float32, device=self.device)
        n = len(prompts)
        sizes = [n // up.num_mini_batches + (1 if i < n % up.num_mini_batches else 0) for i in range(up.num_mini_batches)]
        micro = micro_rows(max(sizes), self.up.gradient_accumulation_steps, self.micro_cap)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead.serves(batch, self.round):
            log.debug("update: the forward run at scoring time was for other rows; running the update's own")
            ahead = None
        # Ratios other than 1 need the "old" logprobs (several epochs or mini-batches): from the trainer itself.
        old = self._old_logprobs(prompts, completions, micro, dist) if up.num_ppo_epochs > 1 or up.num_mini_batches > 1 else None
        stats: dict[str, list[float]] = {"loss": [], "grad_norm": [], "clip_frac": [], "entropy": [], "approx_kl": []}
        pids = batch["prompt_id"].to_list()
        gv_stats: list[dict] = []
        self._tokens = 0
        order = list(range(n))
        lr_used = self.scheduler.get_last_lr()[0]
        empty = 0  # mini-batches without a row on any rank (the same count on every rank)
        for epoch in range(up.num_ppo_epochs):
            if epoch:
                random.Random(self.params.base.seed + self.round * 1000 + epoch).shuffle(order)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for m0, size in zip(starts, sizes):
                mini = order[m0 : m0 + size]
                # the mini-batch over every rank: its rows and tokens normalise the loss; the longest rank sets the
                # number of micro-batches (a rank with fewer runs zero-weight ones: DDP and FSDP need each rank to
                # run the same collectives)
                rows, tokens = dist.all_reduce_sum([len(mini), sum(len(completions[i]) for i in mini)])
                batches = _micro_batches(mini, micro, pids if up.grad_variance else None)
                n_micro = int(max(dist.all_gather(len(batches))))
                if rows == 0:  # fewer rows than mini-batches (score.on_invalid: drop thinned the round)
                    empty += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                gv = _GradVariance(self.model) if up.grad_variance else None
                sums = self._accumulate(batches + [None] * (n_micro - len(batches)), prompts, completions, adv, old,
                                        rows, tokens, dist, gv, ahead)
                loss, ent, clip_num, clip_den, kl, tok = dist.all_reduce_sum(sums)
                stats["loss"].append(loss)
                stats["entropy"].append(ent / max(tok, 1))
                stats["clip_frac"].append(clip_num / max(clip_den, 1))
                stats["approx_kl"].append(kl / max(tok, 1))
                if gv is not None:
                    gv_stats.append(gv.finish())
                lr_used = self.scheduler.get_last_lr()[0]
                stats["grad_norm"].append(self._optimizer_step())
                # the gradients go as soon as the step took them (as transformers' Trainer does), not at the next
                # update: the next round's kept forward reuses their 0.54 GB instead of growing the process
                # (docs/design.md §7)
                self.optimizer.zero_grad(set_to_none=True)
        if empty:
            rows_all = int(dist.all_reduce_sum([n])[0])
            log.warning("update: %d of %d mini-batches of round %d were empty (%d completions for "
                        "update.num_mini_batches=%d): no optimizer step for them, though the learning-rate schedule "
                        "counts them; lower update.num_mini_batches", empty, up.num_ppo_epochs * up.num_mini_batches,
                        self.round + 1, rows_all, up.num_mini_batches)
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
            "update/tokens_per_s": self._tokens / max(seconds, 1e-9),  # trained tokens (all epochs) per second
        }

    @torch.no_grad()
    def _old_logprobs(self, prompts, completions, micro: int, dist) -> list[torch.Tensor]:
        """Per-token logprobs of every completion under the current policy, before any step (TRL's convention). With
        several ranks every rank runs as many forwards as the rank with the most (one-token ones where it has fewer):
        FSDP's every forward is a collective."""
        old: list[torch.Tensor] = []
        starts = range(0, len(prompts), micro)
        most = int(max(dist.all_gather(len(starts))))  # before any forward (one process: its own count)
        for s in starts:
            lp, _, _ = self._logp(prompts[s : s + micro], completions[s : s + micro], sync=True)
            old.extend(lp.float())
        for _ in range(most - len(starts)):
            self._padding_logp(sync=True)
        return old

    def _accumulate(self, batches, prompts, completions, adv, old, rows: float, tokens: float, dist, gv,
                    ahead: _Ahead | None = None) -> list[float]:
        """Forward + backward of one mini-batch's micro-batches (None: a zero-weight one, to match the other ranks'
        count); gradients accumulate, each micro-batch weighted by its share of the mini-batch loss over all ranks
        (rows, or tokens for token aggregation), so they sum to the mini-batch gradient. Returns this rank's sums of
        (share-weighted loss, entropy, clip numerator, clip denominator, approx-KL, tokens). `ahead`: the forward of
        the whole batch, run at scoring time (`forward_ahead`): the one micro-batch of all rows uses it."""
        up = self.up
        sums = [0.0] * 6
        for j, idx in enumerate(batches):
            last = j == len(batches) - 1  # only the last backward of a mini-batch syncs gradients across ranks
            if idx is None:
                self._zero_weight_backward(sync=last)
                continue
            if ahead is not None and idx == list(range(len(prompts))):
                logp, mask, ent = ahead.logp, ahead.mask, ahead.ent
                ahead = None
            else:
                logp, mask, ent = self._logp([prompts[i] for i in idx], [completions[i] for i in idx], True, sync=last)
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
            n_tok = float(mask.sum())
            share = n_tok / max(tokens, 1) if up.loss_aggregation == "token" else len(idx) / rows
            with self._sync(last):
                (loss * share * dist.world_size).backward()  # DDP/FSDP average the ranks' gradients: undo the 1/world
            if gv is not None:
                gv.add(share)
            self._tokens += int(n_tok)
            clip_w = n_tok if up.loss_aggregation == "token" else len(idx)
            sums = [sums[0] + loss.item() * share, sums[1] + float(ent.sum()), sums[2] + float(clip) * clip_w,
                    sums[3] + clip_w, sums[4] + float(0.5 * ((logp.detach() - old_lp) ** 2 * mask).sum()), sums[5] + n_tok]
        return sums

    def scoring_forward_refusal(self, score, rows: int) -> str | None:
        """Why this trainer's forward cannot give the round's policy logprobs at scoring time (`forward_ahead`) under
        the score params `score`, or None when it can (`scoring_forward_refusal`, the module's function)."""
        return scoring_forward_refusal(self.up, score, rows, self.autocast, self.micro_cap, self.dist.enabled)

    def forward_ahead(self, batch: pl.DataFrame) -> list[float]:
        """The update's forward of the round's completions, run when they are scored: each completion's summed
        logprob under the current policy (no gradient), in the update's precision; the forward (its autograd graph)
        is kept for the next `step`, which then runs only the loss and the backward. `step` checks that it trains on
        these rows in this order with these weights, and otherwise runs its own forward. The caller checks
        `scoring_forward_refusal` first."""
        from stages.score import completion_inputs

        self._ahead = None  # a forward kept from an earlier call is dropped (its activations freed) before this one
        prompts, completions = completion_inputs(batch, self.tokenizer)
        with torch.enable_grad():
            logp, mask, ent = self._logp(prompts, completions, True)
        self._ahead = _Ahead(_Ahead.rows_of(batch), self.round, logp, mask, ent)
        return (logp.detach() * mask).double().sum(1).tolist()

    def drop_ahead(self) -> None:
        """Forget a forward kept by `forward_ahead`, freeing its activations (the next score step calls it first; the
        flow also when a run ends, e.g. failing between its score and update steps)."""
        self._ahead = None

    def _zero_weight_backward(self, sync: bool) -> None:
        """A forward/backward that adds nothing to the gradient, for a rank with fewer micro-batches than the others."""
        logp = self._padding_logp(sync)
        with self._sync(sync):
            (logp.sum() * 0.0).backward()

    def _padding_logp(self, sync: bool) -> torch.Tensor:
        """A one-token forward whose result counts for nothing: a rank's share of the others' collectives."""
        tok = self.tokenizer.eos_token_id or 0
        return self._logp([[tok]], [[tok]], sync=sync)[0]

    def _sync(self, sync: bool):
        """No gradient sync across ranks for all but a mini-batch's last backward (DDP no_sync / FSDP's switch)."""
        if self._fsdp is not None:
            self._fsdp.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if sync or not hasattr(self.forward_model, "no_sync"):
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def allocate_optimizer_state(self) -> bool:
        """AdamW's state created now, at load, as a resumed run's is loaded then (docs/design.md §7): the step 0 and
        zero moments its first step would make, in the same dtypes and places (torch's `_init_group`). Left lazy,
        the first update faulted in those 1.08 GB (~260k pages) inside the round, and the next round's kept forward
        grew the process again (round 2 0.3-1.0 s slower here). The state is the lazy one wherever every trainable
        parameter gets a gradient in the first step (a full fine-tune, LoRA's adapters); one that never did would
        carry a state at step 0. Any AdamW without amsgrad, except FSDP's sharded one (left lazy); whether it
        allocated."""
        opt = self.optimizer
        if opt.state or self.sharded or not isinstance(opt, torch.optim.AdamW) or any(
                g["amsgrad"] for g in opt.param_groups):
            return False
        # AdamW's own choice (torch.optim.optimizer._get_scalar_dtype): fp32 when fused, else fp64 under an fp64 default
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in opt.param_groups:
            for p in group["params"]:
                if group["fused"] or group["capturable"]:
                    step = torch.zeros((), dtype=torch.float32 if group["fused"] else scalar, device=p.device)
                else:
                    step = torch.tensor(0.0, dtype=scalar, device="cpu")
                opt.state[p] = {"step": step,
                                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return True

    def _optimizer_step(self) -> float:
        """Clip, check, step the optimizer and the schedule; the gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.up.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, self.up.max_grad_norm)
        else:
            gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not torch.isfinite(gn):
            raise PipelineError(f"update: gradient norm is {gn.item()} at round {self.round + 1}; no step taken; lower update.learning_rate")
        if self.up.fused_layers:  # the MLPs' casts of the weights the step now changes: freed before its peak
            from stages.fused import drop_kept_casts

            drop_kept_casts(self.model)
        self.optimizer.step()
        self.scheduler.step()
        return float(gn)

    # -- what a checkpoint holds (stages.checkpoint owns the files)
    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": _py_rng_to_lists(random.getstate())}

    @property
    def sharded(self) -> bool:
        return self.dist.enabled and self.up.strategy == "fsdp"

    def gathered_state(self) -> dict | None:
        """FSDP: the whole model and optimizer state, gathered from the shards (every rank must call it; rank 0 then
        writes the checkpoint from it). DDP and one process: None (the writer reads the live, replicated state)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = {k: v.detach().clone() for k, v in self.full_state_dict().items()}
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        if not self.dist.main:  # with cpu_offload the full state lands on rank 0 only (the others get {}); it writes
            return {"model": {}, "optimizer": {}}
        return {"model": model, "optimizer": self._indexed(optimizer)}

    def _trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]  # the optimizer's order

    def _indexed(self, sd: dict) -> dict:
        """An optimizer state keyed by parameter name (torch.distributed.checkpoint) -> keyed by position, the plain
        `optimizer.state_dict()` layout, which every checkpoint uses whatever the strategy and world size."""
        pos = {n: i for i, n in enumerate(self._trainable_names())}
        return {"state": {pos[k]: v for k, v in sd["state"].items()},
                "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in sd["param_groups"]]}

    def _named(self, sd: dict) -> dict:
        names = self._trainable_names()
        return {"state": {names[int(k)]: v for k, v in sd["state"].items()},
                "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}

    def resume_state(self, rng: dict | None = None, gathered: dict | None = None) -> dict:
        """Optimizer, scheduler, RNG and round (plus the LoRA adapter): tensors, numbers and lists only, so it loads
        with torch.load(weights_only=True)."""
        optimizer = gathered["optimizer"] if gathered else self.optimizer.state_dict()
        state = {"round": self.round, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                 "rng": rng or self.rng_state()}
        if self.up.use_lora:
            state["adapter"] = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        return state

    def load_resume_state(self, state: dict) -> None:
        self._ahead = None
        if self.up.use_lora:
            self.model.load_state_dict(state["adapter"], strict=False)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, self._named(state["optimizer"]),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The learning rate of the next step from this run's schedule: the saved one was computed over the saved
        # run's length, and a run whose train.rounds was raised since would take its next step at the old schedule's
        # last rate (0 at the end of a linear decay). With the same length this is the saved rate, to the bit.
        self._set_next_lr()
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(_py_rng_from_lists(state["rng"]["python"]))
        self.round = state["round"]

    def plan_schedule(self, rounds: int) -> None:
        """The learning-rate schedule of a run of `rounds` rounds from the step the scheduler is at. A resume replays
        each complete round after the checkpoint under the length that round ran under (its manifest's
        `total_rounds`), then plans the rest over the run's new length (train.rounds raised since: the next steps
        decay over the longer run, docs/design.md §6)."""
        total_steps = rounds * self.up.num_ppo_epochs * self.up.num_mini_batches
        fn = lr_lambda(self.up.warmup_steps, total_steps, self.up.lr_scheduler)
        self.scheduler.lr_lambdas = [fn] * len(self.optimizer.param_groups)
        self._set_next_lr()

    def _set_next_lr(self) -> None:
        sched = self.scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def save_model(self, out_dir: Path, gathered: dict | None = None) -> None:
        """The policy as a normal model dir (merged weights for LoRA, the adapter in adapter/) + tokenizer."""
        if self.up.use_lora:
            self.model.save_pretrained(out_dir / "adapter")
            # the merged weights make a normal model directory that vLLM and transformers load
            self.model.get_base_model().save_pretrained(out_dir, state_dict=self.state_dict_for_sampler())
        elif gathered is not None:
            self.model.save_pretrained(out_dir, state_dict=gathered["model"])
        else:
            self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def micro_rows(rows: int, accumulation_steps: int, micro_cap: int) -> int:
    """Rows per micro-batch for a mini-batch of `rows`: split into `accumulation_steps`
    (update.gradient_accumulation_steps), at most `micro_cap` (update.micro_batch_size, its `auto` resolved for the
    device; 0: no cap)."""
    micro = math.ceil(rows / accumulation_steps) or 1
    return min(micro, micro_cap) if micro_cap else micro


def scoring_forward_refusal(up, score, rows: int, autocast: bool, micro_cap: int, distributed: bool) -> str | None:
    """Why the update's forward (update params `up`, bf16 `autocast`, the resolved `micro_cap`) cannot give a round
    of `rows` completions its policy logprobs at scoring time under the score params `score`, or None when it can:
    in the KL's precision (`score.dtype` resolving to the update's), in one process, one epoch of one mini-batch,
    all rows in one micro-batch. That forward is then the update's own, of the same weights, and the KL's separate
    policy pass is not run (docs/design.md §7)."""
    from stages.runtime import score_dtype

    mine = "bfloat16" if autocast else "float32"
    for cause, setting in (
            (score_dtype(score.dtype) != mine, f"score.dtype resolves to {score_dtype(score.dtype)} and the update "
                                               f"runs in {mine} (update.bf16_autocast)"),
            (distributed, "the round is split over processes (train.nproc_per_node > 1)"),
            (up.num_ppo_epochs > 1, f"update.num_ppo_epochs is {up.num_ppo_epochs}"),
            (up.num_mini_batches > 1, f"update.num_mini_batches is {up.num_mini_batches}"),
            (up.grad_variance, "update.grad_variance runs one micro-batch per prompt")):
        if cause:
            return setting
    micro = micro_rows(rows, up.gradient_accumulation_steps, micro_cap)
    if micro < rows:
        return (f"the round's {rows} completions take micro-batches of {micro} (update.micro_batch_size "
                f"{up.micro_batch_size}, update.gradient_accumulation_steps {up.gradient_accumulation_steps})")
    return None


def _py_rng_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_lists(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def base_identity(model) -> str:
    """Architecture fingerprint: model type, sizes and vocab (a checkpoint must match its base)."""
    cfg = getattr(model, "config", model)
    if hasattr(model, "get_base_model"):
        cfg = model.get_base_model().config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    return ":".join(str(getattr(cfg, k, None)) for k in keys)


def load_trainer(params, device, policy_dir: str | Path | None = None, state_dir: str | Path | None = None,
                 total_rounds: int | None = None, field: str = "train.checkpoint_dir", dist=None,
                 state_field: str = "train.state_dir") -> tuple[Trainer, dict | None]:
    """A trainer on the base model, or restored from the checkpoint in `policy_dir` (+ its state in `state_dir`);
    returns it with the checkpoint's metadata (None when starting from the base)."""
    from stages import checkpoint
    from stages.models import load_config

    meta = checkpoint.read_meta(policy_dir, field) if policy_dir is not None else None
    if meta is None:
        trainer = Trainer(params.base.model_dir, params, device, total_rounds, dist=dist)
        trainer.allocate_optimizer_state()
        return trainer, None
    base_id = base_identity(load_config(params.base.model_dir, "base.model_dir"))
    if meta.get("base_id") != base_id:
        raise PipelineError(f"{field}: {policy_dir} is a checkpoint of a different base model ({meta.get('base_id')} vs "
                            f"{base_id}); point {field} elsewhere or move it away")
    if meta.get("lora") != params.update.use_lora:
        raise PipelineError(f"{field}: {policy_dir} was trained with update.use_lora={meta.get('lora')}; set it back or "
                            f"start over: {restart_command()}")
    checkpoint.verify_model(policy_dir, meta, field)
    state = checkpoint.load_state(state_dir or params.train.state_dir, meta, device, params.train.archive_dir,
                                  state_field)
    # full fine-tuning: the weights are the checkpoint dir itself; LoRA: the base plus the adapter in the state
    if params.update.use_lora:
        trainer = Trainer(params.base.model_dir, params, device, total_rounds, dist=dist)
    else:
        trainer = Trainer(str(policy_dir), params, device, total_rounds, field=field, dist=dist)
    trainer.base_id = base_id
    trainer.load_resume_state(state)
    return trainer, meta


def _check_out(out: str | Path, policy: str | Path | None, field: str) -> None:
    """The stage replaces a checkpoint in `out` only when it wrote it and continues it (`--policy` is the same dir); a
    training run's checkpoint is never its to write (a step from anywhere would drop the run's optimizer state or
    put the checkpoint ahead of the run's rounds)."""
    from stages import checkpoint

    meta = checkpoint.read_meta(out, field) if Path(out).is_dir() else None
    if meta is None:
        return
    if meta.get("identity") and meta.get("source") != "stages.update":  # a training run's: the flow owns it
        raise PipelineError(f"{field}: {out} holds the checkpoint of training run {meta['identity']} (round "
                            f"{meta.get('round')}); this stage does not write into a run's checkpoint (its rounds and "
                            "manifests would no longer match): pass --out DIR and --state-dir DIR elsewhere")
    if policy is not None and Path(policy).resolve() == Path(out).resolve():
        return
    start = f"--policy {policy}" if policy is not None else "the base model"
    raise PipelineError(f"{field}: {out} holds a checkpoint of this stage (round {meta.get('round')}); an update from "
                        f"{start} would replace it; pass --out DIR (and --state-dir DIR) elsewhere, or --policy {out} "
                        "to continue it")


def _policy_arg(policy: str | None, base_dir: str, out: str) -> str | None:
    """`--policy` as `load_trainer` takes it: None (the base model) for base.model_dir itself; a model dir this
    pipeline did not write (no checkpoint.json) is refused with how to start from it, and so is a dir that does not
    exist or is empty (a mistyped path would train from the base model), except `out` itself: `--policy D --out D`
    starts D from the base model and then continues it."""
    from stages import checkpoint

    if policy is None or (Path(policy) / checkpoint.META).is_file():
        return policy
    if Path(policy).resolve() == Path(base_dir).resolve():
        return None
    if (Path(policy) / "config.json").is_file():
        raise PipelineError(f"--policy: {policy} is a model dir, not a checkpoint this pipeline wrote; to update it "
                            f"from its own weights set base.model_dir: {policy} and leave --policy out")
    if Path(policy).resolve() != Path(out).resolve() and not (Path(policy).is_dir() and any(Path(policy).iterdir())):
        raise PipelineError(f"--policy: {policy} holds no checkpoint (it does not exist or is empty); pass the dir "
                            "a run or this stage wrote, or leave --policy out to start from base.model_dir")
    return policy  # (load_trainer says what else is wrong with it)


def main(argv: list[str] | None = None) -> None:
    from stages.io import read_table
    from stages.params import load_params
    from stages.runtime import configure_env, setup_torch
    from stages.schemas import ADVANTAGES, SAMPLES

    parser = argparse.ArgumentParser(prog="python -m stages.update", description="One RLOO policy update.")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--advantages", required=True)
    parser.add_argument("--policy", default=None, help="a checkpoint of this stage or of a run to continue from "
                        "(default, or base.model_dir itself: the base model)")
    parser.add_argument("--out", default=None, help="checkpoint dir to write (default: train.checkpoint_dir)")
    parser.add_argument("--state-dir", default=None, help="trainer state dir, read and written (default: train.state_dir)")
    args = parser.parse_args(argv)

    from stages import checkpoint

    params = load_params(args.params)
    out = args.out or params.train.checkpoint_dir
    if args.out and not args.state_dir and Path(args.out).resolve() != Path(params.train.checkpoint_dir).resolve():
        # the state file (~1 GB for SmolLM2) would go into the training run's own state dir, and move with it
        raise PipelineError(f"--state-dir: give --out {args.out} a trainer-state dir of its own (e.g. --state-dir "
                            f"{Path(args.out).parent / (Path(args.out).name + '_state')}); the default, train.state_dir "
                            f"({params.train.state_dir}), is the training run's")
    policy = _policy_arg(args.policy, params.base.model_dir, out)
    _check_out(out, policy, "--out" if args.out else "train.checkpoint_dir")
    configure_env(params.base.threads)
    device = setup_torch(params.base.device, params.base.threads, params.base.seed)
    samples = read_table(args.samples, SAMPLES)
    batch = training_batch(samples, read_table(args.advantages, ADVANTAGES))
    if batch.height < samples.height:  # training_batch refused advantages without a sample, not the other way round
        log.warning("%s: %d of %d samples have no advantage in %s and are not trained on (score.on_invalid: drop "
                    "leaves a prompt's invalid rows out; otherwise pass the advantages of every sample)", args.samples,
                    samples.height - batch.height, samples.height, args.advantages)
    state_dir = args.state_dir or params.train.state_dir
    read_dir, read_field = state_dir, "--state-dir" if args.state_dir else "train.state_dir"
    meta = checkpoint.read_meta(policy, "--policy") if policy else None
    if (meta and meta.get("source") != "stages.update" and args.state_dir
            and not checkpoint.state_file(state_dir, meta["checkpoint_id"]).is_file()):
        # a training run's checkpoint, continued into this stage's own --out: its state is read from the run's
        # train.state_dir, and the new one written to --state-dir (the run's files stay as they are)
        read_dir, read_field = params.train.state_dir, "train.state_dir"
    trainer, meta = load_trainer(params, device, policy, read_dir, field="--policy", state_field=read_field)
    stats = trainer.step(batch)
    # no run identity: a flow finding it takes it for another run's (stages/loop/resume.py), never for its own
    checkpoint.save(trainer, out, state_dir, {"identity": None, "source": "stages.update"})
    log.info("update: loss %.4f, grad_norm %.3f, entropy %.3f -> %s", stats["loss"], stats["grad_norm"], stats["entropy"], out)


if __name__ == "__main__":
    run_cli(main)
