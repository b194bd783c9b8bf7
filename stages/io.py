"""Atomic writes and validated reads of the pipeline's Parquet and JSON artifacts.

Every write goes to a temporary file in the destination's directory and is then renamed over the
destination (`os.replace`, atomic on POSIX): a crash or an exception mid-write leaves the previous file
intact and never a half-written one. Reads check the table against its contract in `stages.schemas`
and fail with one line naming the file and the column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from stages.errors import PipelineError, disk_full_message
from stages.schemas import Schema, check, conform


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it to `dest`, on error delete it. A full disk becomes
    a one-line PipelineError naming `dest` (the earlier `dest` is untouched)."""
    dest = Path(dest)
    tmp_path = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, dest)
    except BaseException as exc:  # a Ctrl-C too: no temporary file is left behind
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)  # first: the space it took counts in the message
        full = disk_full_message(exc, dest) if isinstance(exc, Exception) else None  # Ctrl-C stays Ctrl-C
        if full is not None:
            raise PipelineError(full) from None
        raise


def hash_file(path: str | Path, h=None):
    """`h` (a new SHA-256 by default) fed with the file's bytes, read in 1 MiB blocks; returned."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def write_table(df: pl.DataFrame, dest: str | Path, schema: Schema | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Validate `df` against `schema` (if given), cast to the contract types and write it atomically, with the
    Parquet file's key-value `metadata` (`pl.read_parquet_metadata` reads it back)."""
    if schema is not None:
        problem = check(df.schema, schema, f"writing {dest}")
        if problem:
            raise PipelineError(problem)
        df = conform(df, schema)
    with atomic_path(dest, ".parquet") as tmp:
        df.write_parquet(tmp, metadata=metadata)
    return Path(dest)


def _bad_json_line(path: Path, max_lines: int = 1_000_000) -> str | None:
    """Where a JSONL file that polars refused first goes wrong (polars names a character, not the line): the first
    non-blank line that is not a JSON object, as `line N: <why>` (undecodable bytes included); None when the first
    `max_lines` lines parse, or the file cannot be read again. Never raises: it only adds to an error."""
    import json

    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if n > max_lines:
                    return None
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    why = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                    return f"line {n}: {why.splitlines()[0][:200] if why else type(exc).__name__}"
                if not isinstance(row, dict):
                    return f"line {n}: a JSON {type(row).__name__}, not an object ({{\"prompt\": ...}})"
    except Exception:
        return None
    return None


def read_table(path: str | Path, schema: Schema | None = None) -> pl.DataFrame:
    """Read a Parquet (or JSONL/CSV) table and validate it against `schema`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found; run the stage that writes it first or pass the right path")
    if path.suffix in (".jsonl", ".ndjson", ".csv") and _blank(path):
        example = '{"prompt": "..."} per line' if path.suffix != ".csv" else "a header line (e.g. prompt) and one row per line"
        raise PipelineError(f"{path}: the file is empty; add rows ({example})")
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path)
        # column types from every row, not polars' first 100: a column that starts late, or null first, or ints
        # then floats/text, is read whole (as datasets reads it), not dropped or refused
        elif path.suffix in (".jsonl", ".ndjson"):
            df = pl.read_ndjson(path, infer_schema_length=None)
        elif path.suffix == ".csv":
            df = pl.read_csv(path, infer_schema_length=None)
        else:
            raise PipelineError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .jsonl or .csv")
    except PipelineError:
        raise
    except Exception as exc:  # polars raises many types for corrupt files
        first = next(iter(str(exc).strip().splitlines()), "")
        where = _bad_json_line(path) if path.suffix in (".jsonl", ".ndjson") else None
        raise PipelineError(f"{path}: cannot be read ({type(exc).__name__}: {first})"
                            + (f"; {where}" if where else "")) from None
    if schema is not None:
        problem = check(df.schema, schema, str(path))
        if problem:
            from stages.schemas import PROMPTS

            if schema is PROMPTS and "missing column" in problem:  # e.g. a raw prompts file given to a stage
                problem += ("; a stage takes the prepared prompts: python -m stages.prepare (dvc repro prepare) writes "
                            "data/prepared/train.parquet and eval.parquet from your prompts file")
            raise PipelineError(problem)
        df = conform(df, schema)
    return df


def _blank(path: Path) -> bool:
    """Nothing but whitespace in a text table (read only when small: a large file has content)."""
    return path.stat().st_size < 1 << 16 and not path.read_bytes().strip()


def write_json(obj: Any, dest: str | Path) -> Path:
    """Write JSON atomically (sorted keys, indented, so DVC diffs read well)."""
    with atomic_path(dest, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(dest)


def write_text(text: str, dest: str | Path) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


# what reading a small JSON record (a marker, a manifest) and taking its fields raises when it is damaged or
# unreadable: read_json's PipelineError, OSError, UnicodeDecodeError (a ValueError), a missing key, a wrong type
UNREADABLE = (PipelineError, OSError, ValueError, KeyError, TypeError)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
