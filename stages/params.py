"""Typed parameters: `params.yaml` loaded into frozen pydantic models.

Every model forbids unknown keys, so a typo (`learnig_rate`) fails with the field's name instead of
being silently ignored. `load_params()` turns pydantic's report into one line that names the field,
what was wrong and the allowed values, raised as `PipelineError` (exit code 2 through `run_cli`).

    python -m stages.params [params.yaml]     # validate a params file and print it resolved
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import PipelineError, run_cli

DEFAULT_PARAMS = Path("params.yaml")
BUILTIN_MODEL = "smollm2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Section):
    seed: int = Field(42, description="global seed; each round samples with seed + round")
    model: str = Field(BUILTIN_MODEL, description="'smollm2' (embedded GGUF) or a local transformers model dir")
    model_dir: str = Field("models/base", description="where prepare writes the base model")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="device of trainer/reference/reward models")
    threads: int = Field(0, ge=0, description="torch threads; 0 = all cores")


class PrepareParams(_Section):
    prompts: str = Field("data/prompts/movie_reviews.jsonl", description="Parquet/JSONL/CSV with a `prompt` column")
    eval_size: int = Field(48, ge=1, description="held-out prompts")
    split_seed: int = Field(42, ge=0, description="seed of the train/held-out split (not base.seed: seed sweeps keep one held-out set)")
    system_prompt: str | None = Field(None, description="optional system message")
    max_prompt_tokens: int = Field(128, ge=1, description="longest allowed prompt, in tokens")


class SampleParams(_Section):
    backend: Literal["auto", "vllm", "hf"] = Field("auto", description="sampling engine")
    k: int = Field(4, ge=1, description="completions per prompt")
    max_completion_length: int = Field(40, ge=1, description="generated tokens per completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    stop: list[str] = Field(default_factory=list, description="extra stop strings")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="sampler dtype; auto = bf16 where the hardware has it")
    batch_size: int = Field(32, ge=1, description="prompts per generate() call (hf)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM GPU memory fraction")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size")
    max_model_len: int = Field(512, ge=16, description="vLLM context length")
    enforce_eager: bool = Field(True, description="vLLM eager mode")
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="vLLM CPU KV cache (GiB)")


class RewardSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="component name -> column score/<name>")
    function: str | None = Field(None, description="built-in reward name or 'module:function'")
    model: str | None = Field(None, description="local sequence-classification reward model dir")
    weight: float = Field(1.0, description="weight in the summed score")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments of the function")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("set exactly one of `function` (built-in or module:function) and `model` (a local dir)")
        return self


class ScoreParams(_Section):
    rewards: list[RewardSpec] = Field(min_length=1, description="weighted reward components")
    beta: float = Field(0.02, ge=0, description="KL coefficient")
    kl_level: Literal["sequence", "token"] = Field("sequence", description="KL summed or per-token mean")
    missing_eos_penalty: float | None = Field(None, ge=0, description="penalty when no EOS")
    batch_size: int = Field(16, ge=1, description="completions per forward pass")
    on_invalid: Literal["error", "drop"] = Field("error", description="NaN/inf reward handling")
    ref_model: str | None = Field(None, description="reference policy dir; null = base.model_dir")
    policy_logprobs: Literal["auto", "trainer", "sampler"] = Field(
        "auto", description="logp_policy from the trainer's forward or the sampler's logprobs; auto = sampler when it runs fp32"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ScoreParams:
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        return self


Estimator = Literal["rloo", "reinforce", "batch_mean", "moving_average", "ema", "grpo"]


class AdvantageParams(_Section):
    estimator: Estimator = Field("rloo", description="baseline estimator")
    alpha: float = Field(0.9, ge=0, lt=1, description="ema decay")
    window: int | None = Field(None, ge=1, description="moving_average window in rounds")
    epsilon: float = Field(1e-6, gt=0, description="grpo std floor")
    normalize_advantages: bool = Field(False, description="whiten over the batch")


class UpdateParams(_Section):
    learning_rate: float = Field(3e-6, gt=0, description="AdamW learning rate")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = Field(1.0, ge=0, description="0 = no clipping")
    num_mini_batches: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    micro_batch_size: int = Field(16, ge=0, description="max completions per forward/backward (0 = no cap); bounds memory")
    num_ppo_epochs: int = Field(1, ge=1)
    cliprange: float = Field(0.2, gt=0)
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    bf16_autocast: bool = True
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save_every: int = Field(1, ge=1)
    grad_variance: bool = Field(False, description="measure the policy-gradient variance across prompt groups (one prompt per micro-batch)")


class EvaluateParams(_Section):
    greedy: bool = True
    max_completion_length: int = Field(40, ge=1)
    num_examples: int = Field(8, ge=0)


class TrainParams(_Section):
    rounds: int = Field(8, ge=1)
    prompts_per_round: int = Field(12, ge=1)
    eval_every: int = Field(0, ge=0)
    rounds_dir: str = "data/rounds"
    checkpoint_dir: str = "models/policy"
    async_checkpoint: bool = Field(True, description="write each round's checkpoint + manifest in a background thread")


class MlflowParams(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "rloo-pipeline"
    log_completions: int = Field(16, ge=0)


class Params(_Section):
    base: BaseParams = BaseParams()
    prepare: PrepareParams = PrepareParams()
    sample: SampleParams = SampleParams()
    score: ScoreParams
    advantage: AdvantageParams = AdvantageParams()
    update: UpdateParams = UpdateParams()
    evaluate: EvaluateParams = EvaluateParams()
    train: TrainParams = TrainParams()
    mlflow: MlflowParams = MlflowParams()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.advantage.estimator in ("rloo", "grpo") and self.sample.k < 2:
            # K=1 makes the leave-one-out baseline 0/0: silent all-zero advantages. Reject it.
            raise ValueError(
                f"sample.k: must be >= 2 for advantage.estimator={self.advantage.estimator} "
                f"(got {self.sample.k}); raise sample.k or pick reinforce|batch_mean|moving_average|ema"
            )
        return self

    def hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (all when none): the run's configuration identity."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """`section.field` -> value, for MLflow params."""
        out: dict[str, Any] = {}
        for section, fields in self.model_dump(mode="json").items():
            for key, value in fields.items():
                out[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
        return out


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see params.yaml"
        return f"{source}: unknown field `{loc}`; allowed fields here: {allowed}"
    if err["type"] == "value_error" and msg.startswith(("sample.k", "score.")):
        return f"{source}: {msg}"
    got = err.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    where = f"`{loc}`: " if loc else ""
    more = f" [+{exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
    return f"{source}: {where}{msg}{got_txt}{more}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def parse_params(data: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise PipelineError with a one-line message."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping of sections (base, prepare, ...), got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_format_error(exc, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; `overrides` maps `section.field` to a value (like `-S`)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found; run from the repo root or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise PipelineError(f"{path}: not valid YAML (line {None if line is None else line + 1}); fix the syntax") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of sections (base, prepare, ...), got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, field = dotted.partition(".")
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise PipelineError(f"{path}: section `{section}` must be a mapping to set {dotted}")
        data[section][field] = value
    return parse_params(data, str(path))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    params = load_params(args[0] if args else DEFAULT_PARAMS)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":
    run_cli(main)
