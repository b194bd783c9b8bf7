"""What a training run keeps warm: loaded once, used by every round (docs/design.md §3).

A round never starts the sampling engine or reads a model from disk: the engine, the policy with its optimizer,
the reference and the reward models live in a `Warm` for the whole run, and each update's weights go into the
running engine before it next generates (`steps.sync_sampler`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

log = logging.getLogger(__name__)

PREPARED_TRAIN = "data/prepared/train.parquet"
PREPARED_EVAL = "data/prepared/eval.parquet"


@dataclass
class Warm:
    """Everything loaded once per run."""

    params: Any  # stages.params.Params
    device: Any  # torch.device
    sampler: Any  # stages.sample.Sampler
    trainer: Any  # stages.update.Trainer
    ref: Any  # the reference policy (fp32, eval mode)
    rewards: list  # stages.rewards.Reward
    tokenizer: Any
    train_prompts: pl.DataFrame
    eval_prompts: pl.DataFrame | None
    adv_state: dict | None = None  # the advantage estimator's carried state (stages.advantage)
    ref_eval: tuple | None = None  # (ref_samples, ref_scores) on the held-out prompts, fixed for the run
    ref_eval_cache: Any = None  # stages.logprobs.PromptCache: the reference's keys/values of those prompts (fp32)
    # the reference with bf16 copies of its linear weights, for the rounds' bf16 reference pass on a CPU (each pass
    # cast every weight again there; models.with_bf16_linears); None: the rounds use `ref` itself
    ref_bf16: Any = None
    dist: Any = None  # stages.loop.dist.Dist: this process's rank in the run (one process: SINGLE)
    eval_order: list = field(default_factory=list)  # every held-out prompt id, in order (eval_prompts: this rank's)
    timings: dict = field(default_factory=dict)
    total_rounds: int = 0  # this run's length (train.rounds or --rounds): TRL's trainer_state.max_steps
    # the trainer's weights were the reference's, bit for bit, when loaded (a fresh run from the reference's
    # weights): until its first update the round's KL is 0 without a reference pass (`steps.reference_for`)
    policy_is_ref: bool = False
    # the trainer has updated since the engine last got its weights: `steps.sync_sampler` pushes them before the
    # engine's next use (a round's sampling, an evaluation), so a run's last update is pushed only if something
    # generates after it
    sampler_behind: bool = False
    # the seconds of a push made by a try of the flow's sampling task that then failed (`flows.train.sample_task`):
    # its retry finds the engine up to date and reports these instead of its own 0
    unreported_push_s: float = 0.0


def eval_subset(heldout: pl.DataFrame, n: int) -> pl.DataFrame:
    """The held-out prompts of the in-training evaluations: the first `train.eval_prompts` (0 = all of them)."""
    return heldout.head(n) if n else heldout


def read_prepared(path: str):
    """A prepared prompts table, or one line naming the command that writes it (`stages.prepare`)."""
    from stages.errors import PipelineError
    from stages.io import read_table
    from stages.prepare import prepare_command
    from stages.schemas import PROMPTS

    if not Path(path).is_file():
        raise PipelineError(f"{path}: not found; prepare the prompts first: {prepare_command()} (`dvc repro` does it)")
    return read_table(path, PROMPTS)


def check_inputs(params) -> None:
    """What `load_warm` or a round would refuse and the user names, without loading a model: the rewards (a
    built-in's kwargs, a function importable with its kwargs, a reward model dir), the reference dir, the prepared
    tables made from what `prepare.*` names now (`stages.prepare.check_prepared`), and every prepared prompt fitting `sample.max_model_len` with its completion (else the engine would start first and the
    round that draws the prompt would stop). `flows.train` runs it before the warm load (a bad setting fails in a
    moment, not after the models and the engine load) and, with several processes, once before the ranks start: one
    line there, not one per rank."""
    from stages.io import read_table
    from stages.models import check_model_dir, load_tokenizer
    from stages.prepare import check_prepared
    from stages.rewards import check_specs
    from stages.sample import check_prompt_fit, tokenize_prompts
    from stages.schemas import PROMPTS
    from stages.score import extra_columns

    if params.score.ref_model:
        check_model_dir(params.score.ref_model, "score.ref_model")
    # the columns rewards name, where the prepared table is there (load_warm reports a missing one in one line),
    # made from what prepare.* names now
    prepared = Path(PREPARED_TRAIN).is_file()
    check_prepared(params, [PREPARED_TRAIN, PREPARED_EVAL])
    train = read_table(PREPARED_TRAIN, PROMPTS) if prepared else None
    check_specs(params.score.rewards, extra_columns(train) if prepared else None)
    if prepared and train.height and Path(params.base.model_dir, "config.json").is_file():
        tokenizer = load_tokenizer(params.base.model_dir, "base.model_dir")
        tables = [(train, params.sample.max_completion_length)]
        if Path(PREPARED_EVAL).is_file():
            held_out = read_table(PREPARED_EVAL, PROMPTS)
            if held_out.height:
                tables.append((held_out, params.evaluate.max_completion_length))
        for table, max_tokens in tables:
            check_prompt_fit(table, tokenize_prompts(tokenizer, table)[1], params.sample.max_model_len, max_tokens)


def warn_small_split(per_round: int, n: int) -> bool:
    """A training split smaller than a round trains on all of it every round: said once, at load (a batch size a
    user set that the data cannot fill)."""
    if n >= per_round:
        return False
    log.warning("train.prompts_per_round=%d, but the training split has %d prompts: every round trains on all of them "
                "(x K completions); add prompts or lower train.prompts_per_round", per_round, n)
    return True


def load_warm(params, total_rounds: int, checkpoint: dict | None = None, with_eval: bool = False, dist=None,
              device: str | None = None) -> Warm:
    """Load everything a run keeps warm: the trainer (from `checkpoint`'s dirs when resuming, else the base), the
    reference, the rewards, and the sampler engine (started once on the reference weights; it gets the trainer's
    whenever they differ from the reference's: resuming, or a policy dir other than the reference). `with_eval`
    also generates the reference policy's held-out completions once, for the in-training evaluations. With several
    ranks (`dist`) every rank loads its own copy and engine, on `device`."""
    from stages.errors import PipelineError
    from stages.evaluate import generate_one, task_scores
    from stages.loop.dist import SINGLE
    from stages.logprobs import PromptCache
    from stages.models import load_causal_lm, load_tokenizer, same_weights, with_bf16_linears
    from stages.rewards import build_rewards, check_columns
    from stages.score import extra_columns
    from stages.runtime import score_dtype, setup_torch
    from stages.sample import make_sampler
    from stages.score import completion_inputs
    from stages.update import load_trainer

    dist = dist or SINGLE
    device = setup_torch(device or params.base.device, params.base.threads, params.base.seed)
    tokenizer = load_tokenizer(params.base.model_dir, "base.model_dir")
    train_prompts = read_prepared(PREPARED_TRAIN)
    if dist.main:  # said once, not once per rank
        warn_small_split(params.train.prompts_per_round, train_prompts.height)
    all_eval = eval_subset(read_prepared(PREPARED_EVAL), params.train.eval_prompts) if with_eval else None
    eval_prompts = all_eval[dist.shard(all_eval.height)] if with_eval else None
    tp = params.train
    trainer, _ = load_trainer(params, device, tp.checkpoint_dir if checkpoint else None, tp.state_dir, total_rounds,
                              dist=dist)
    if params.score.policy_logprobs == "update":
        rows = tp.prompts_per_round * params.sample.k
        if (why := trainer.scoring_forward_refusal(params.score, rows)) is not None:
            raise PipelineError(f"score.policy_logprobs: update needs the update's forward to be the KL's policy pass, "
                                f"but {why}; set it to auto (a separate pass where needed) or trainer")
    ref_dir = params.score.ref_model or params.base.model_dir
    ref_field = "score.ref_model" if params.score.ref_model else "base.model_dir"
    ref = load_causal_lm(ref_dir, "float32", device, ref_field).eval()
    rewards = build_rewards(params.score.rewards, device=device, batch_size=params.score.batch_size)
    check_columns(rewards, extra_columns(train_prompts))  # before a superseded run moves aside, not in round 1
    sampler = make_sampler(str(ref_dir), params, field=ref_field, device=device)
    w = Warm(params, device, sampler, trainer, ref, rewards, tokenizer, train_prompts, eval_prompts, dist=dist,
             total_rounds=total_rounds,
             eval_order=all_eval["prompt_id"].to_list() if with_eval else [])
    if device.type == "cpu" and score_dtype(params.score.dtype) == "bfloat16":
        w.ref_bf16 = with_bf16_linears(ref)  # +a bf16 copy of its linear weights (0.27 GB for SmolLM2-135M)
    if with_eval and eval_prompts.height:
        ref_samples = generate_one(sampler, tokenizer, eval_prompts, params, params.base.seed, 0, logprobs=False)
        w.ref_eval = (ref_samples, task_scores(ref_samples, rewards, eval_prompts, params.score.on_invalid))
        # every evaluation scores new completions of these prompts under this reference: its prompt pass, once
        try:
            w.ref_eval_cache = PromptCache(ref, completion_inputs(ref_samples, tokenizer)[0], tokenizer.pad_token_id,
                                           params.score.batch_size)
        except ValueError as e:  # a sliding-window model: the evaluations run the full reference pass
            log.info("evaluation without the reference's prompt cache: %s", e)
    elif with_eval:
        w.ref_eval = (None, None)  # more ranks than held-out prompts: this one evaluates none
    # the engine started on the reference's weights (the held-out baseline above is the reference's completions);
    # it samples the policy's from round 1 on: a resumed trainer's, or a fresh one from another dir than the
    # reference (`base.model_dir` vs `score.ref_model`), pushed at its first use (after any replayed rounds)
    w.policy_is_ref = checkpoint is None and same_weights(trainer.model, ref)  # a copy of it in another dir too
    w.sampler_behind = not w.policy_is_ref
    return w
