"""The Parquet contracts between stages (docs/design.md §6), declared once.

Keys are `prompt_id` (string, stable across rounds) and `sample_idx` (0..K-1). Each later table keeps
the keys and adds columns; nothing is renamed. `stages.io.read_table` / `write_table` validate against
these: a missing column or a column of the wrong type is an error naming the file and the column.
Extra columns are allowed (e.g. one `score/<name>` column per reward component).
"""

from __future__ import annotations

import hashlib

import polars as pl

Schema = dict[str, pl.DataType | type[pl.DataType]]

KEYS: Schema = {"prompt_id": pl.String, "sample_idx": pl.Int32}

PROMPTS: Schema = {
    "prompt_id": pl.String,  # stable: hash of the prompt text (or of its messages)
    "prompt": pl.String,  # raw user text (for a conversation: its last user turn)
    "messages": pl.String,  # JSON list of chat messages fed to the chat template
    "conversational": pl.Boolean,  # the source gave messages (TRL's conversational format): rewards get them so
}
# Extra columns of the prompts file (e.g. `answer`, `solution`) follow in the prepared tables, unchanged.
# Names a prepared table's extra columns never have: the contract's own, and what the reward functions get by name
# besides the columns (prepare keeps a source's column so named as `source_<name>`).
TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric")  # what TRL passes every reward function besides the columns
RESERVED_COLUMNS = ("prompt_id", "prompt", "messages", "conversational", "prompts", "completions", "completion_ids",
                    *TRL_EXTRAS)

SAMPLES: Schema = {
    **KEYS,
    "prompt_text": pl.String,  # prompt as fed to the model (chat template applied)
    "completion": pl.String,
    "completion_token_ids": pl.List(pl.Int32),
    "sampler_logprobs": pl.List(pl.Float32),  # sampler's raw logprob of each sampled token
    "num_tokens": pl.Int32,
    "finish_reason": pl.String,  # "stop" | "length"
    "policy_version": pl.Int32,  # rounds of updates the sampling policy has had
}

SCORES: Schema = {
    **KEYS,
    "score": pl.Float64,  # weighted task reward; components in score/<name>
    "logp_policy": pl.Float64,
    "logp_ref": pl.Float64,
    "kl": pl.Float64,
    "rlhf_reward": pl.Float64,  # score - beta * kl (- missing_eos_penalty)
}

ADVANTAGES: Schema = {
    **KEYS,
    "rlhf_reward": pl.Float64,
    "baseline": pl.Float64,
    "advantage": pl.Float64,
    "estimator": pl.String,
}

# Optional in scores and advantages: which completion a row was computed from. `score` writes it from the samples,
# `advantage` carries it, and the update refuses advantages whose digest differs from its samples' (scores of one
# round's samples with advantages trained on another's: same keys, other completions). A table without it (an
# earlier version's, or one a user built) is not checked.
DIGEST = "sample_digest"


def sample_digest(samples: pl.DataFrame) -> pl.Series:
    """Per row, 16 hex digits of BLAKE2b over the prompt text and the completion's token ids (as little-endian int32):
    stable across polars versions (polars' own `hash` is not). The ids are hashed from one flat array, not per token
    in Python: ~10 us a row of 512 tokens."""
    import numpy as np

    ids = samples["completion_token_ids"]
    lens = ids.list.len().fill_null(0).to_numpy()
    flat = ids.explode().drop_nulls().cast(pl.Int32).to_numpy().astype("<i4", copy=False)
    ends = np.cumsum(lens)
    out = []
    for text, end, n in zip(samples["prompt_text"], ends, lens):
        h = hashlib.blake2b(text.encode(), digest_size=8)
        h.update(b"\0")
        h.update(flat[end - n:end].tobytes())
        out.append(h.hexdigest())
    return pl.Series(DIGEST, out, dtype=pl.String)


# Float columns accept either width (a user may hand us float32 rewards); ints accept any int width.
_FLOATS = {pl.Float32, pl.Float64}
_INTS = {pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64}


def _compatible(actual: pl.DataType, expected: pl.DataType | type[pl.DataType]) -> bool:
    if actual == expected:
        return True
    base = expected if isinstance(expected, type) else type(expected)
    if base in _FLOATS:
        return actual.base_type() in _FLOATS or actual.base_type() in _INTS
    if base in _INTS:
        return actual.base_type() in _INTS
    if base is pl.List and isinstance(actual, pl.List) and isinstance(expected, pl.List):
        return _compatible(actual.inner, expected.inner)
    return False


def check(schema: pl.Schema | dict, expected: Schema, where: str) -> str | None:
    """Return a one-line problem description, or None when `schema` satisfies `expected`."""
    missing = [c for c in expected if c not in schema]
    if missing:
        return f"{where}: missing column(s) {missing}; expected at least {list(expected)}"
    for col, dtype in expected.items():
        if not _compatible(schema[col], dtype):
            return f"{where}: column `{col}` has type {schema[col]}, expected {dtype}"
    return None


def conform(df: pl.DataFrame, expected: Schema) -> pl.DataFrame:
    """Cast the contract columns to their exact declared types (extra columns untouched)."""
    return df.with_columns(pl.col(c).cast(t) for c, t in expected.items() if df.schema[c] != t)
