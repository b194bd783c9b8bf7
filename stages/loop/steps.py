"""One round's steps as plain functions over a `Warm` (no Prefect, no MLflow, no files written): the flow's tasks
wrap them and add the artifacts; the benchmarks call them bare (docs/design.md §3). `replay_round` re-applies a
complete round's update from its artifacts when a run resumes from an older checkpoint.

    prompts = round_prompts(w.train_prompts, r, per_round, seed)
    samples, s = sample_round(w, r, prompts)          # K completions per prompt, from the running engine
    scores, sc = score_round(w, samples)              # rewards, logp under policy and reference, KL, rlhf_reward
    advs, state, a = advantage_round(w, scores)       # the estimator's baseline (w.adv_state carries over)
    u = update_round(w, samples, advs)                # REINFORCE step(s); the engine gets the weights at its next use

With several ranks (`w.dist`, docs/design.md §8) each step works on this rank's share of the round's prompts (all K
completions of a prompt on one rank) and returns the whole round's table, gathered in the order one process makes
it, so every caller sees what a one-process run sees; the statistics come from the whole table.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from stages.loop.warm import Warm


def my_prompt_ids(w: Warm, table: pl.DataFrame) -> set[str]:
    """The prompts of a round table that this rank works on (its share of the round's prompt order)."""
    order = table["prompt_id"].unique(maintain_order=True).to_list()
    return {order[i] for i in w.dist.shard(len(order))}


def sample_round(w: Warm, r: int, prompts: pl.DataFrame, logprobs: bool | None = None) -> tuple[pl.DataFrame, dict]:
    """The round's K completions per prompt. `logprobs`: ask the engine for each token's logprob; by default only
    where the round uses them (`round_uses_sampler_logprobs`), else `sampler_logprobs` is null."""
    from stages.sample import generation_config, sample_prompts, sample_stats
    from stages.schemas import SAMPLES

    sync_s = sync_sampler(w)
    sp, t0 = w.params.sample, time.perf_counter()
    local = prompts[w.dist.shard(prompts.height)]
    if logprobs is None:
        logprobs = round_uses_sampler_logprobs(w)
    if local.height:
        df, stats = sample_prompts(w.sampler, w.tokenizer, local, generation_config(sp, logprobs=logprobs),
                                   w.params.base.seed, r, r, sp.max_model_len)
    else:  # more ranks than prompts: this one samples nothing this round
        df, stats = pl.DataFrame(schema=SAMPLES), {}
    if w.dist.enabled:
        df = w.dist.gather_rows(df, prompts["prompt_id"].to_list())
        stats = sample_stats(df, time.perf_counter() - t0)
    return df, stats | {"time/weight_sync_s": sync_s}


def sync_sampler(w: Warm) -> float:
    """Push the trainer's weights into the running engine if it has updated since the engine last got them (no
    restart, no disk); the seconds it took, 0 when there was nothing to push. Every use of the engine after the
    warm-up calls it first (`load_warm`'s own held-out baseline is the reference's completions, on purpose), so each
    update's weights are pushed once, before they are sampled from, and a run's last update is not pushed when
    nothing generates after it (docs/design.md §3)."""
    if not w.sampler_behind:
        return 0.0
    t0 = time.perf_counter()
    w.sampler.update_weights(state_dict=w.trainer.state_dict_for_sampler())
    w.sampler_behind = False
    return time.perf_counter() - t0


def sampler_logprobs_are_policys(choice: str, sampler_exact: bool, temperature: float = 1.0) -> bool:
    """`score.policy_logprobs` (`choice`): reuse the sampler's logprobs as logp_policy (auto: when they are the fp32
    policy's own, `sampler_exact`; measured 1.6e-4 nats max per 40-token sequence against the fp32 trainer,
    docs/design.md §7), and the KL is of the raw logits: `temperature` (`sample.temperature`) 1 (params refuse an
    explicit `sampler` at another one)."""
    return choice == "sampler" or (choice == "auto" and sampler_exact and temperature == 1.0)


def round_uses_sampler_logprobs(w: Warm) -> bool:
    """Whether a training round reads the engine's logprobs: as the KL's policy logprobs (`score.policy_logprobs`
    resolving to `sampler`, whatever the round's size: `auto` with an fp32 engine, or asked for). Where it does not
    (`auto` with a bf16 engine, `update`, `trainer`: the update's forward or a trainer pass gives them), the round
    does not ask for them: -0.12 s of the 1.40 s a round's sampling takes on the 2-core Xeon with AMX, the same
    tokens (docs/design.md §7)."""
    return sampler_logprobs_are_policys(w.params.score.policy_logprobs, w.sampler.exact_logprobs,
                                        w.params.sample.temperature)


def resolve_policy_logprobs(params, rows: int, sampler_exact: bool, autocast: bool, micro_cap: int,
                            distributed: bool) -> str:
    """Where a round's policy logprobs (the KL's) come from under `score.policy_logprobs`, for a round of `rows`
    completions on this rank: `sampler` (the engine's own, when they are the fp32 policy's, `sampler_exact`, or
    the user says so), `update` (the update's forward, run at scoring time and kept for the update,
    `Trainer.forward_ahead`: one pass less a round, where that forward is the pass the KL would run,
    `scoring_forward_refusal`; for `update` or `auto`) or `trainer` (a separate pass). The one decision the flow,
    its MLflow tag and the benchmarks share; `load_warm` has refused an explicit `update` that cannot be."""
    from stages.update import scoring_forward_refusal

    choice = params.score.policy_logprobs
    if sampler_logprobs_are_policys(choice, sampler_exact, params.sample.temperature):
        return "sampler"
    if choice in ("auto", "update") and scoring_forward_refusal(params.update, params.score, rows, autocast, micro_cap,
                                                                distributed) is None:
        return "update"
    return "trainer"


def policy_logprobs_for(w: Warm, rows: int) -> str:
    """`resolve_policy_logprobs` for the warm run's sampler and trainer, for a round of `rows` completions here."""
    return resolve_policy_logprobs(w.params, rows, w.sampler.exact_logprobs, w.trainer.autocast, w.trainer.micro_cap,
                                   w.dist.enabled)


def policy_logprobs_source(w: Warm) -> str:
    """What `score.policy_logprobs` resolves to for this run's rounds (the flow's MLflow tag and manifests):
    `sampler`, `update` or `trainer`."""
    return policy_logprobs_for(w, len(w.dist.shard(w.params.train.prompts_per_round)) * w.params.sample.k)


def reference_for(w: Warm):
    """The model whose logprobs are the round's reference: the trainer's own policy while it still is the reference,
    bit for bit (a fresh run's first round): `score_samples` then copies the policy's logprobs, the KL is exactly 0
    and the round skips the reference pass (3.1-4.6 s of a 21-27 s round on 2 AVX2 cores; docs/design.md §7).
    Otherwise `scoring_reference`."""
    if w.policy_is_ref and w.trainer.round == 0:
        return w.trainer.model
    return scoring_reference(w)


def scoring_reference(w: Warm):
    """The reference as a round's reference pass runs it: its bf16 view where the run keeps one (`Warm.ref_bf16`:
    the same numbers) and the pass is bf16 under the current params, else the reference itself."""
    from stages.runtime import score_dtype

    if w.ref_bf16 is not None and score_dtype(w.params.score.dtype) == "bfloat16":
        return w.ref_bf16
    return w.ref


def policy_pass_batches(w: Warm, rows: int, runs: bool) -> int:
    """How many batches this rank's pass of the policy over `rows` completions runs at least (`runs`: whether it
    runs one): under FSDP each forward of the policy is a collective, so every rank runs as many as the rank with the
    most rows (`sequence_logprobs`' min_batches; ranks with fewer, or none, pad). 0 where nothing is sharded."""
    if not (w.dist.enabled and w.trainer.sharded):
        return 0
    mine = -(-rows // w.params.score.batch_size) if runs else 0
    return int(max(w.dist.all_gather(mine)))


def score_round(w: Warm, samples: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    from stages.score import check_not_all_dropped, optimizer_steps, score_samples, score_stats

    t0 = time.perf_counter()
    local = samples.filter(pl.col("prompt_id").is_in(my_prompt_ids(w, samples))) if w.dist.enabled else samples
    source = policy_logprobs_for(w, local.height)
    if source == "sampler" and samples["sampler_logprobs"].null_count():  # the whole round's: every rank alike
        from stages.errors import PipelineError

        raise PipelineError("score.policy_logprobs: the round's policy logprobs are the sampler's, but its samples "
                            "were drawn without them (sample_round(logprobs=False)); sample the round with logprobs")
    logp_policy = [float(sum(x)) for x in local["sampler_logprobs"]] if source == "sampler" else None
    ahead_s: list[float] = []

    def update_forward() -> list[float]:  # the policy's logprobs from the update's own forward (kept for it)
        t1 = time.perf_counter()
        out = w.trainer.forward_ahead(local)
        ahead_s.append(time.perf_counter() - t1)
        return out

    w.trainer.drop_ahead()
    out, stats = score_samples(local, w.rewards, w.trainer.model, reference_for(w), w.tokenizer, w.params.score,
                               w.train_prompts, update_forward if source == "update" else logp_policy,
                               share_prompts=w.params.base.share_prompts,
                               steps=optimizer_steps(w.params, int(samples["policy_version"].max() or 0), w.total_rounds),
                               policy_batches=policy_pass_batches(w, local.height, source == "trainer"),
                               batch_size=local.height if source == "update" else 0,
                               temperature=w.params.sample.temperature)
    if ahead_s:  # (counted in time/logprobs_s)
        stats["time/policy_forward_s"] = ahead_s[0]
    if w.dist.enabled:
        out = w.dist.gather_rows(out, samples["prompt_id"].unique(maintain_order=True).to_list())
    check_not_all_dropped(out, samples.height)  # the whole round's (after the gather): every rank alike
    if not w.dist.enabled:
        return out, stats
    components = [r.name for r in w.rewards]
    full = score_stats(out, samples.height, components, stats["time/reward_s"], time.perf_counter() - t0)
    return out, full | {k: v for k, v in stats.items() if k not in full}  # a reward's log_metric: this rank's mean


def advantage_round(w: Warm, scores: pl.DataFrame, source: str = "scores") -> tuple[pl.DataFrame, dict, dict]:
    """Advantages of the round; returns (table, the next carried state, stats). The caller stores the state. Every
    rank computes them over the whole round, so batch-level estimators see what one process sees."""
    from stages.advantage import compute_advantages

    # the params hold sample.k >= 2 for the group estimators, so under `score.on_invalid: drop` a round whose every
    # prompt has one completion left is one the drop thinned: each gets advantage 0, as a partly thinned round's
    # singletons do (otherwise such a round is refused, as the stage refuses it)
    return compute_advantages(scores, w.params.advantage, w.adv_state, source=source,
                              singletons_ok=w.params.score.on_invalid == "drop")


def update_round(w: Warm, samples: pl.DataFrame, advantages: pl.DataFrame) -> dict:
    """One policy update (each rank on its share of the rows). The new weights reach the running engine before its
    next use (`sync_sampler`: the next round's sampling or an evaluation, which times the push)."""
    from stages.update import training_batch

    batch = training_batch(samples, advantages)
    if w.dist.enabled:
        batch = batch.filter(pl.col("prompt_id").is_in(my_prompt_ids(w, samples)))
    w.policy_is_ref = False  # from the first optimizer step on (even one that then fails) it is not
    w.sampler_behind = True  # (likewise: pushing unchanged weights costs a push, not a wrong sample)
    return w.trainer.step(batch, w.dist)


def replay_round(w: Warm, d: Path) -> dict:
    """A complete round's update applied again from its own artifacts, on a trainer resumed from an older checkpoint
    (`update.save_every > 1`): the batch the round trained on, read back from its Parquet files; no sampling or
    scoring. The update is deterministic given its batch and the trainer's state (its mini-batch order is seeded
    by the round), so the trainer ends where the round left it (docs/design.md §6)."""
    from stages.io import read_table
    from stages.schemas import ADVANTAGES, SAMPLES

    return update_round(w, read_table(d / "samples.parquet", SAMPLES), read_table(d / "advantages.parquet", ADVANTAGES))


def keep_checkpoint_weights(trainer, model_dir) -> float:
    """Put a model dir's weights (its safetensors files: a checkpoint's) into the trainer in place; returns the largest
    absolute difference they had from the trainer's (the replay's). Every trainable tensor must be there."""
    import torch
    from safetensors import safe_open

    mine = dict(trainer.model.named_parameters())
    worst, seen = 0.0, set()
    with torch.no_grad():
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    p = mine.get(name)
                    if p is None or name in seen:
                        continue
                    t = st.get_tensor(name).to(p.device, p.dtype)
                    if t.shape != p.shape:
                        continue
                    worst = max(worst, float((p.detach() - t).abs().max()) if p.numel() else 0.0)
                    p.copy_(t)
                    seen.add(name)
    missed = [n for n, p in mine.items() if p.requires_grad and n not in seen]
    if missed:
        from stages.errors import PipelineError

        raise PipelineError(f"{model_dir}: the checkpoint's weights lack {missed[0]} ({len(missed)} tensors) that the "
                            "trainer has; it is not this run's model: restore it or start over")
    return worst


def evaluate_round(w: Warm, version: int) -> dict:
    """The current policy against the reference on the held-out prompts, with the warm engine and models (each rank
    on its share of them)."""
    from stages.evaluate import eval_metrics, eval_temperature, evaluate_policy, generate_one

    p = w.params
    if w.ref_eval is None:
        raise RuntimeError("load_warm(with_eval=True) prepares the reference's held-out completions")
    ref_samples, ref_scores = w.ref_eval
    sync_sampler(w)  # the policy's held-out completions come from the engine
    temperature = eval_temperature(p)
    exact = w.sampler.exact_logprobs and temperature == 1.0  # the engine's raw logprobs are the KL's
    batches = policy_pass_batches(w, w.eval_prompts.height, not exact)  # one completion a prompt
    if w.eval_prompts.height:
        pol = generate_one(w.sampler, w.tokenizer, w.eval_prompts, p, p.base.seed, version, logprobs=exact)
        table, _ = evaluate_policy(pol, ref_samples, ref_scores, w.rewards, w.trainer.model, w.ref, w.tokenizer,
                                   w.eval_prompts, p.score.batch_size, sampler_exact=exact,
                                   ref_prompt_cache=w.ref_eval_cache, policy_batches=batches,
                                   on_invalid=p.score.on_invalid, with_metrics=False, temperature=temperature)
    else:
        table = None
        if batches:  # no held-out prompt here: this rank's share of the policy's collectives all the same
            from stages.logprobs import sequence_logprobs

            sequence_logprobs(w.trainer.model, [], [], w.tokenizer.pad_token_id, p.score.batch_size,
                              min_batches=batches)
    if w.dist.enabled:
        parts = [t for t in w.dist.all_gather(table) if t is not None]
        order = {pid: i for i, pid in enumerate(w.eval_order)}
        table = pl.concat(parts).sort(pl.col("prompt_id").replace_strict(order, return_dtype=pl.Int64))
    return eval_metrics(table)
