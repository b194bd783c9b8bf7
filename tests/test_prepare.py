"""stages.prepare: the pure prompt functions, prepare() on a user's prompts + a tiny local model, its errors,
and (slow) the embedded GGUF -> transformers conversion."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
from pathlib import Path

import polars as pl
import pytest
import yaml

from stages.errors import PipelineError
from stages.io import read_table
from stages.models import load_tokenizer, messages_for, render_prompt
from stages.params import parse_params
from stages.prepare import (
    check_prompt_lengths,
    clean_prompts,
    prepare,
    prepare_model,
    prompt_id,
    prompts_frame,
    split_prompts,
)
from stages.schemas import PROMPTS

REPO = Path(__file__).resolve().parents[1]

PROMPT_TEXTS = [
    "write a short review of a film you liked",
    "tell me about the best movie you have seen",
    "what did you think of the music and the cast",
    "the movie was great",
    "a dull film with a terrible plot",
    "i loved every minute of it",
    "the story is slow but the ending is good",
    "this is a test prompt for the pipeline",
    "the acting was wonderful",
    "tell me about the ending",
    "what did you think of the plot",
    "write a review of the story",
]


def params_for(tmp_path: Path, model: str | Path, prompts: str | Path, **prepare_overrides):
    """The repo's params.yaml with every path inside tmp_path."""
    data = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    data["base"]["model"] = str(model)
    data["base"]["model_dir"] = str(tmp_path / "models" / "base")
    data["prepare"]["prompts"] = str(prompts)
    data["prepare"]["eval_size"] = 3
    data["prepare"].update(prepare_overrides)
    return parse_params(data, "test-params")


def write_csv(path: Path, prompts: list[str | None]) -> Path:
    pl.DataFrame({"prompt": prompts, "other": list(range(len(prompts)))}).write_csv(path)
    return path


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "label": i}) + "\n" for i, p in enumerate(prompts)))
    return path


# --- pure functions ----------------------------------------------------------------------------------------


def test_prompt_id_is_stable():
    assert prompt_id("hello") == "aaf4c61ddcc5"  # sha1("hello")[:12]: the same in every process and run
    assert prompt_id("  hello\n") == prompt_id("hello")
    assert prompt_id("hello") != prompt_id("Hello")
    pid = prompt_id("the movie was great")
    assert len(pid) == 12 and pid == hashlib.sha1(b"the movie was great").hexdigest()[:12]


def test_clean_prompts_strips_dedupes_and_keeps_order():
    df = pl.DataFrame({"prompt": ["  b ", "a", None, "b", "", "   ", "c\n", "a"], "answer": list("12345678")})
    table, dropped = clean_prompts(df, "f.csv")
    assert table["prompt"].to_list() == ["b", "a", "c"] and dropped == 2
    assert table["answer"].to_list() == ["1", "2", "7"]  # extra columns travel with their (first) row


def test_clean_prompts_missing_column():
    with pytest.raises(PipelineError) as exc:
        clean_prompts(pl.DataFrame({"text": ["a"]}), "f.csv")
    msg = str(exc.value)
    assert msg.startswith("f.csv: no `prompt` column") and "text" in msg and "\n" not in msg


def test_clean_prompts_non_string_column():
    with pytest.raises(PipelineError, match=r"^f.csv: column `prompt` must be text or a list of messages, got Int64"):
        clean_prompts(pl.DataFrame({"prompt": [1, 2]}), "f.csv")


@pytest.mark.parametrize("values", [[], [None, None], ["", "  ", "\n"]])
def test_clean_prompts_empty(values):
    df = pl.DataFrame({"prompt": values}, schema={"prompt": pl.String})
    with pytest.raises(PipelineError, match=r"^f.csv: no non-empty prompts"):
        clean_prompts(df, "f.csv")


def test_empty_prompts_are_skipped_and_counted(caplog):
    df = pl.DataFrame({"prompt": ["a", None, "  ", "b", "a"]}, schema={"prompt": pl.String})
    with caplog.at_level("WARNING", logger="stages.prepare"):
        table, dropped = clean_prompts(df, "f.csv")
    assert table["prompt"].to_list() == ["a", "b"] and dropped == 1
    assert "f.csv: 2 row(s) with an empty or null `prompt` skipped" in caplog.text


def test_conversations_without_a_user_text_are_skipped_and_counted(caplog):
    """A conversation whose last user turn is blank, or that has no user turn (a system message alone), has no prompt:
    it was kept, with the system text or "" as `prompt`."""
    def conv(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    df = pl.DataFrame({"prompt": [conv(("user", "hi")), conv(("user", " ")), conv(("system", "x")), None,
                                  conv(("system", "x"), ("user", "ok")), conv(("user", "a"), ("assistant", "b"))]})
    with caplog.at_level("WARNING", logger="stages.prepare"):
        table, dropped = clean_prompts(df, "f.jsonl")
    assert table["prompt"].to_list() == ["hi", "ok", "a"] and dropped == 0
    assert "f.jsonl: 3 row(s) with an empty or null `prompt` skipped" in caplog.text


def test_split_is_a_seeded_partition():
    train, held = split_prompts(PROMPT_TEXTS, 4, seed=42)
    assert len(held) == 4 and len(train) == len(PROMPT_TEXTS) - 4
    assert sorted(train + held) == sorted(PROMPT_TEXTS) and not set(train) & set(held)
    assert split_prompts(PROMPT_TEXTS, 4, seed=42) == (train, held)  # deterministic
    others = {tuple(split_prompts(PROMPT_TEXTS, 4, seed=s)[1]) for s in range(1, 6)}
    assert len(others | {tuple(held)}) > 1  # the seed matters


def test_split_is_independent_of_input_order():
    want = split_prompts(PROMPT_TEXTS, 3, seed=7)
    for s in range(5):
        shuffled = PROMPT_TEXTS[:]
        random.Random(s).shuffle(shuffled)
        assert split_prompts(shuffled, 3, seed=7) == want


@pytest.mark.parametrize("eval_size", [len(PROMPT_TEXTS), len(PROMPT_TEXTS) + 5])
def test_split_eval_size_too_big(eval_size):
    with pytest.raises(PipelineError) as exc:
        split_prompts(PROMPT_TEXTS, eval_size, seed=0)
    msg = str(exc.value)
    assert msg.startswith("prepare.eval_size:") and str(eval_size) in msg and str(len(PROMPT_TEXTS)) in msg


def test_split_leaves_one_to_train():
    train, held = split_prompts(PROMPT_TEXTS[:2], 1, seed=0)
    assert len(train) == len(held) == 1


def test_prompts_frame_matches_the_contract():
    df = prompts_frame(["a b", "c"], None)
    assert df.schema == pl.Schema(PROMPTS) and df["conversational"].to_list() == [False, False]
    assert df["prompt_id"].to_list() == [prompt_id("a b"), prompt_id("c")]
    assert json.loads(df["messages"][0]) == [{"role": "user", "content": "a b"}]
    with_system = prompts_frame(["a b"], "be brief")
    assert json.loads(with_system["messages"][0]) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a b"},
    ]
    empty = prompts_frame([], None)
    assert empty.height == 0 and empty.schema == pl.Schema(PROMPTS)


def test_check_prompt_lengths(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    df = prompts_frame(["the movie was great", "a dull film"], None)
    # "<user> the movie was great <eos> <assistant>": 7 tokens with the tiny chat template
    assert check_prompt_lengths(df, tok, 128) == 7
    assert check_prompt_lengths(df, tok, 7) == 7
    with pytest.raises(PipelineError, match=rf"prompt {prompt_id('the movie was great')} \('the movie was great'...\) is 7 tokens.*limit 6"):
        check_prompt_lengths(df, tok, 6)


# --- prepare() with a user's prompts and a local model -----------------------------------------------------


def model_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_prepare_with_local_model(tmp_path, tiny_model_dir, fmt):
    raw = [" " + PROMPT_TEXTS[0], *PROMPT_TEXTS, PROMPT_TEXTS[3]]  # a duplicate and stray whitespace
    if fmt == "csv":
        prompts = write_csv(tmp_path / "prompts.csv", [*raw, None])
    elif fmt == "jsonl":
        prompts = write_jsonl(tmp_path / "prompts.jsonl", raw)
    else:
        prompts = tmp_path / "prompts.parquet"
        pl.DataFrame({"prompt": raw}).write_parquet(prompts)
    params = params_for(tmp_path, tiny_model_dir, prompts, system_prompt="be brief")
    out = tmp_path / "data" / "prepared"

    summary = prepare(params, out)

    # the model was copied to base.model_dir, with a marker naming its source
    dest = Path(params.base.model_dir)
    assert model_files(tiny_model_dir) <= model_files(dest)
    assert (dest / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert json.loads((dest / "prepare.json").read_text())["source"].startswith(f"dir:{tiny_model_dir.resolve()}:")
    assert [p.name for p in dest.parent.iterdir()] == ["base"]  # no staging dir left behind

    train = read_table(out / "train.parquet", PROMPTS)
    held = read_table(out / "eval.parquet", PROMPTS)
    extra = {"csv": {"other": pl.Int64}, "jsonl": {"label": pl.Int64}, "parquet": {}}[fmt]
    assert train.schema == pl.Schema({**PROMPTS, **extra}) and held.schema == train.schema  # extra columns travel
    assert held.height == 3 and train.height == len(PROMPT_TEXTS) - 3
    assert not set(train["prompt_id"]) & set(held["prompt_id"])
    assert set(train["prompt"]) | set(held["prompt"]) == set(PROMPT_TEXTS)
    assert (set(train["prompt"]), set(held["prompt"])) == tuple(map(set, split_prompts(PROMPT_TEXTS, 3, params.prepare.split_seed)))
    for row in train.iter_rows(named=True):
        assert row["prompt_id"] == prompt_id(row["prompt"])
        assert json.loads(row["messages"]) == messages_for(row["prompt"], "be brief")

    tok = load_tokenizer(dest)
    longest = max(
        len(tok(render_prompt(tok, m), add_special_tokens=False)["input_ids"])
        for m in [*train["messages"], *held["messages"]]
    )
    assert summary == {"train_prompts": len(PROMPT_TEXTS) - 3, "eval_prompts": 3, "longest_prompt_tokens": longest,
                       "duplicates_dropped": 2, "conversational": False, "extra_columns": list(extra)}
    assert "<system>" in render_prompt(tok, train["messages"][0])


def test_prepare_split_does_not_depend_on_file_order(tmp_path, tiny_model_dir):
    a = params_for(tmp_path, tiny_model_dir, write_csv(tmp_path / "a.csv", PROMPT_TEXTS))
    shuffled = PROMPT_TEXTS[::-1]
    b = params_for(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "b.jsonl", shuffled))
    prepare(a, tmp_path / "a")
    prepare(b, tmp_path / "b")
    for name in ("train.parquet", "eval.parquet"):
        a_, b_ = read_table(tmp_path / "a" / name), read_table(tmp_path / "b" / name)
        assert a_.select(list(PROMPTS)).equals(b_.select(list(PROMPTS)))


def test_prepare_model_is_skipped_when_up_to_date(tmp_path, tiny_model_dir, tiny_model_factory):
    params = params_for(tmp_path, tiny_model_dir, "unused.csv")
    dest = prepare_model(params)
    weights = dest / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_model(params) == dest
    assert weights.stat().st_mtime_ns == mtime

    # another source model -> copied again
    other = tiny_model_factory(tmp_path / "other", seed=1)
    params2 = params_for(tmp_path, other, "unused.csv")
    prepare_model(params2)
    assert weights.read_bytes() == (other / "model.safetensors").read_bytes()
    assert json.loads((dest / "prepare.json").read_text())["source"].startswith(f"dir:{other.resolve()}:")


def test_prepare_model_rewrites_a_damaged_copy(tmp_path, tiny_model_dir):
    """base.model_dir is a DVC `persist` output (not deleted before prepare runs): a file of it changed since it was
    written (truncated, edited, restored as a copy) is not up to date, so prepare writes the dir again."""
    params = params_for(tmp_path, tiny_model_dir, "unused.csv")
    dest = prepare_model(params)
    weights = dest / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    prepare_model(params)
    assert weights.read_bytes() == good


def test_a_failing_check_keeps_the_old_model(tmp_path, tiny_model_dir, tiny_model_factory):
    """`check` (prepare's prompt lengths under the new tokenizer) runs before the new model replaces the old one."""
    dest = prepare_model(params_for(tmp_path, tiny_model_dir, "unused.csv"))
    before = (dest / "model.safetensors").read_bytes()
    other = tiny_model_factory(tmp_path / "other", seed=1)

    def refuse(model_dir):
        assert model_dir != dest  # the staged copy
        raise PipelineError("prepare.max_prompt_tokens: too long")

    with pytest.raises(PipelineError, match="too long"):
        prepare_model(params_for(tmp_path, other, "unused.csv"), refuse)
    assert (dest / "model.safetensors").read_bytes() == before
    assert [p.name for p in dest.parent.iterdir()] == ["base"]  # no staging dir left behind


def test_prepare_model_recopies_a_changed_source(tmp_path, tiny_model_factory):
    src = tiny_model_factory(tmp_path / "user_model", seed=0)
    params = params_for(tmp_path, src, "unused.csv")
    dest = prepare_model(params)
    shutil.rmtree(src)
    tiny_model_factory(src, seed=1)  # the user retrains / re-saves their model at the same path
    prepare_model(params)
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_prompt_too_long(tmp_path, tiny_model_dir):
    long_prompt = " ".join(["the movie was great"] * 20)  # 80 words
    prompts = write_csv(tmp_path / "p.csv", [*PROMPT_TEXTS, long_prompt])
    params = params_for(tmp_path, tiny_model_dir, prompts, max_prompt_tokens=32)
    out = tmp_path / "data" / "prepared"
    with pytest.raises(PipelineError) as exc:
        prepare(params, out)
    msg = str(exc.value)
    assert msg.startswith("prepare.max_prompt_tokens:") and prompt_id(long_prompt) in msg and "limit 32" in msg
    assert "('the movie was great the movie was great'...)" in msg  # which prompt, in words
    assert "\n" not in msg
    assert not out.exists()  # nothing written


def test_missing_base_model(tmp_path):
    prompts = write_csv(tmp_path / "p.csv", PROMPT_TEXTS)
    missing = tmp_path / "no" / "such_model"
    params = params_for(tmp_path, missing, prompts)
    with pytest.raises(PipelineError) as exc:
        prepare(params, tmp_path / "out")
    msg = str(exc.value)
    assert msg.startswith("base.model:") and str(missing) in msg and "does not exist" in msg
    assert "fix the path" in msg and "stages.prepare" not in msg  # not the command that just failed
    assert not (tmp_path / "out").exists() and not Path(params.base.model_dir).exists()


@pytest.mark.parametrize("field, hint", [("base.model_dir", "run `python -m stages.prepare`"),
                                         ("score.rewards[rm].model", "fix the path"),
                                         ("score.ref_model", "fix the path")])
def test_a_missing_model_dir_names_the_fix_for_its_field(tmp_path, field, hint):
    """Only base.model_dir is written by prepare; any other model dir is the user's path (nothing is downloaded)."""
    from stages.models import check_model_dir

    with pytest.raises(PipelineError) as exc:
        check_model_dir(tmp_path / "absent", field)
    msg = str(exc.value)
    assert msg.startswith(f"{field}: model directory ") and hint in msg
    assert ("stages.prepare" in msg) == (field == "base.model_dir")


def test_base_model_without_config(tmp_path):
    (tmp_path / "empty_model").mkdir()
    params = params_for(tmp_path, tmp_path / "empty_model", write_csv(tmp_path / "p.csv", PROMPT_TEXTS))
    with pytest.raises(PipelineError, match=r"^base.model: .*empty_model has no config.json"):
        prepare(params, tmp_path / "out")


def no_tokenizer_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    src = tmp_path / "no_tokenizer"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, src / name)
    return src


def test_base_model_without_tokenizer_leaves_no_model_dir(tmp_path, tiny_model_dir):
    params = params_for(tmp_path, no_tokenizer_model(tmp_path, tiny_model_dir), "unused.csv")
    with pytest.raises(PipelineError, match=r"^base.model: cannot load a tokenizer"):
        prepare_model(params)
    models = Path(params.base.model_dir).parent
    assert list(models.iterdir()) == []  # neither base/ nor a staging dir


def test_a_model_dir_whose_tokenizer_is_built_empty_is_refused_and_models_base_kept(tmp_path, tiny_model_dir):
    """transformers 5 builds an empty tokenizer (no vocabulary: every text becomes no tokens) for a Qwen2 dir without
    tokenizer files instead of raising; prepare used to copy such a dir over a good models/base, and training then
    failed inside vLLM ("The decoder prompt cannot be empty")."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = tmp_path / "qwen2_no_tokenizer"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1)).save_pretrained(src)
    good = params_for(tmp_path, tiny_model_dir, "unused.csv")
    prepare_model(good)
    before = {f.name: f.read_bytes() for f in Path(good.base.model_dir).iterdir()}
    params = params_for(tmp_path, src, "unused.csv")
    with pytest.raises(PipelineError, match=r"^base.model: .*qwen2_no_tokenizer has no usable tokenizer .*; copy the "
                                            r"model's tokenizer files"):
        prepare_model(params)
    assert {f.name: f.read_bytes() for f in Path(good.base.model_dir).iterdir()} == before


def test_tokenizer_error_is_one_line(tmp_path, tiny_model_dir):
    params = params_for(tmp_path, no_tokenizer_model(tmp_path, tiny_model_dir), "unused.csv")
    with pytest.raises(PipelineError) as exc:
        prepare_model(params)
    assert "\n" not in str(exc.value)


def test_missing_prompts_file(tmp_path, tiny_model_dir):
    params = params_for(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl")
    with pytest.raises(PipelineError, match=r"^prepare.prompts: .*nope.jsonl not found"):
        prepare(params, tmp_path / "out")


def test_eval_size_too_big_in_prepare(tmp_path, tiny_model_dir):
    params = params_for(tmp_path, tiny_model_dir, write_csv(tmp_path / "p.csv", PROMPT_TEXTS[:3]), eval_size=3)
    with pytest.raises(PipelineError, match=r"^prepare.eval_size: 3 held-out prompts leave none to train on \(3 prompts\); "
                       r"lower it below 3 or add prompts to prepare.prompts$"):
        prepare(params, tmp_path / "out")
    assert not Path(params.base.model_dir).exists()  # checked before the model is copied
    # one prompt: eval_size cannot go lower than 1, so the fix is more prompts
    params = params_for(tmp_path, tiny_model_dir, write_csv(tmp_path / "p1.csv", PROMPT_TEXTS[:1]), eval_size=1)
    with pytest.raises(PipelineError, match=r"\(1 prompts\); add prompts to prepare.prompts \(at least one is held out"):
        prepare(params, tmp_path / "out")


def test_prompts_file_without_prompt_column(tmp_path, tiny_model_dir):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n')
    params = params_for(tmp_path, tiny_model_dir, path)
    with pytest.raises(PipelineError, match=rf"^{path}: no `prompt` column"):
        prepare(params, tmp_path / "out")


# --- the embedded GGUF (slow: ~30-60 s to dequantise 135M parameters) -----------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(base_model_dir, tmp_path_factory):
    """base.model = smollm2 through prepare_model, i.e. convert_gguf(gguf_path(), <staging dir>) + marker: the
    session's converted base model (conftest), with this module's params.yaml-based params pointing at it (one
    conversion and one 0.5 GB copy per suite, not two)."""
    params = params_for(tmp_path_factory.mktemp("smollm2"), "smollm2", "unused.jsonl")
    params = params.model_copy(update={"base": params.base.model_copy(update={"model_dir": str(base_model_dir)})})
    return base_model_dir, params


@pytest.mark.slow
def test_gguf_conversion_loads_in_transformers(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2_dir
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not list(path.glob("*.gguf"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template and tok.eos_token_id is not None

    messages = [{"role": "user", "content": "Write one sentence about a movie you liked."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]
    assert len(new) > 0
    text = tok.decode(new, skip_special_tokens=True)
    assert text.strip(), f"empty completion: {tok.decode(new)!r}"


@pytest.mark.slow
def test_gguf_prepare_is_a_no_op_the_second_time(smollm2_dir):
    path, params = smollm2_dir
    marker = json.loads((path / "prepare.json").read_text())
    assert marker["source"].startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf:")
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_model(params) == path
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["base"]


@pytest.mark.slow
def test_gguf_model_file_permissions(smollm2_dir):
    path, _ = smollm2_dir
    mask = os.umask(0)
    os.umask(mask)
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f"{f.name}: {oct(f.stat().st_mode)}"


def test_a_source_dirs_fingerprint_is_the_one_earlier_versions_recorded(tmp_path):
    """A model dir prepared by an earlier version is not copied again: the file list hashed for a source dir is
    the (relpath, size, mtime) tuples that version hashed, whatever `_files_of` returns."""
    from stages.prepare import _files_of

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"1234")
    (tmp_path / "prepare.json").write_text("{}")  # a source dir's own file of that name counts too
    earlier = sorted((str(f.relative_to(tmp_path)), f.stat().st_size, f.stat().st_mtime_ns)
                     for f in tmp_path.rglob("*") if f.is_file())
    assert repr([tuple(f) for f in _files_of(tmp_path, marker=None)]) == repr(earlier)
    assert len(_files_of(tmp_path)) == 2  # a written dir's list leaves its marker out


def test_prepared_tables_record_what_they_are_made_from_and_a_changed_setting_is_refused(tmp_path, tiny_model_dir,
                                                                                        monkeypatch, caplog):
    """The prepared tables carry what made them (the prompts' content, every prepare.* setting that shapes them) in
    their Parquet metadata; the flow's input check refuses them, in one line naming the change and the fix, when the
    params name other prompts or settings (a run would train on prompts prepare.* no longer describes), or when the
    two tables come from different prepares; a table from before the record passes, and so does a checkout without
    the prompts file under its recorded name (with a warning)."""
    from stages.errors import params_file_named
    from stages.loop import warm
    from stages.prepare import PREPARED_KEY, check_prepared

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_TEXTS)
    params = params_for(tmp_path, tiny_model_dir, prompts)
    out = tmp_path / "data" / "prepared"
    prepare(params, out)
    tables = [out / "train.parquet", out / "eval.parquet"]
    for table in tables:
        record = json.loads(pl.read_parquet_metadata(table)[PREPARED_KEY])
        assert record["eval_size"] == 3 and record["system_prompt"] is None and len(record["prompts_sha256"]) == 64
        assert "max_prompt_tokens" not in record  # a limit, checked at prepare: the tables do not depend on it
    os.utime(prompts, ns=(1, 1))  # the same prompts, touched: the same tables, byte for byte (DVC hashes them)
    prepare(params, tmp_path / "again")
    assert [(tmp_path / "again" / t.name).read_bytes() for t in tables] == [t.read_bytes() for t in tables]
    check_prepared(params, tables)
    check_prepared(params_for(tmp_path, tiny_model_dir, f"{tmp_path}/./prompts.jsonl"), tables)  # the same file
    check_prepared(params_for(tmp_path, tiny_model_dir, prompts, max_prompt_tokens=64), tables)
    changed = params_for(tmp_path, tiny_model_dir, prompts, eval_size=4, system_prompt="be brief")
    with pytest.raises(PipelineError) as exc:
        check_prepared(changed, tables)
    assert str(exc.value) == (
        f"{tables[0]}: prepared from other prompts or settings than these params name: prepare.eval_size (3 then, 4 "
        "now), prepare.system_prompt (None then, 'be brief' now); prepare again first: python -m stages.prepare "
        "(`dvc repro` does it)")
    with params_file_named("mine.yaml"), pytest.raises(PipelineError, match=r"python -m stages.prepare --params mine"):
        check_prepared(changed, tables)
    write_jsonl(prompts, PROMPT_TEXTS[:-1])  # the same path, other prompts
    with pytest.raises(PipelineError, match=re.escape(f"prepare.prompts ({prompts}: its content)")):
        check_prepared(params, tables)
    other = tmp_path / "other.jsonl"  # another file named: that is what differs, not the content of the one named
    write_jsonl(other, PROMPT_TEXTS[:-2])
    with pytest.raises(PipelineError, match=re.escape(f"prepare.prompts ({str(prompts)!r} then, {str(other)!r} now)")):
        check_prepared(params_for(tmp_path, tiny_model_dir, other), tables)
    with pytest.raises(PipelineError, match=r"^prepare.prompts: .*nope.jsonl not found"):  # a typo: named as such
        check_prepared(params_for(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl"), tables)
    prompts.unlink()  # a checkout with the prepared tables only: nothing to check them against
    with caplog.at_level(logging.WARNING, logger="stages.prepare"):
        check_prepared(params, tables)
    assert "cannot be checked against it" in caplog.text
    write_jsonl(prompts, PROMPT_TEXTS)
    # the flow's check before it loads anything (and before it moves another run aside), from the repo's paths
    monkeypatch.chdir(tmp_path)
    warm.check_inputs(params)
    (out / "eval.parquet").write_bytes(b"PAR1 cut short")  # damaged: one line, not polars' traceback
    with pytest.raises(PipelineError, match=r"eval.parquet: cannot be read \(.*\); prepare again: python -m "):
        warm.check_inputs(params)
    pl.read_parquet(tables[0]).write_parquet(out / "eval.parquet")  # no record: another prepare than train's
    with pytest.raises(PipelineError, match=r"eval.parquet and data/prepared/train.parquet come from different "):
        warm.check_inputs(params)
    for table in tables:
        pl.read_parquet(table).write_parquet(table)  # both from before the record: not checked
    warm.check_inputs(params)


def test_a_jsonl_file_mixing_text_and_chat_prompts_is_refused_naming_the_line(tmp_path):
    """polars reads a `prompt` column that is text on some lines and a list of messages on others as text, each list
    as its JSON: every conversation would have been trained on as a JSON string. Refused, naming the first line of
    the rarer kind; a text file whose prompts start with '[' is text all the same."""
    import json

    from stages.errors import PipelineError
    from stages.prepare import read_prompts_source

    chat = [{"prompt": [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{i}+1?"}]}
            for i in range(5)]
    mostly_chat = tmp_path / "mostly_chat.jsonl"
    mostly_chat.write_text("\n".join(json.dumps(r) for r in [*chat[:3], {"prompt": "What is 100+1?"}, *chat[3:]]) + "\n")
    with pytest.raises(PipelineError, match=r"mostly_chat.jsonl line 4: `prompt` is text, but on 5 other line\(s\) it "
                                            r"is a list of messages \(line 1\); give every line the same format"):
        read_prompts_source(mostly_chat)
    mostly_text = tmp_path / "mostly_text.jsonl"
    mostly_text.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a"}, {"prompt": "b"}, chat[0]]) + "\n\n")
    with pytest.raises(PipelineError, match=r"mostly_text.jsonl line 3: `prompt` is a list of messages, but on 2 "):
        read_prompts_source(mostly_text)
    brackets = tmp_path / "brackets.jsonl"
    brackets.write_text('{"prompt": "[x] is a checkbox"}\n{"prompt": "[{\\"role\\": 1}]"}\n')
    assert read_prompts_source(brackets)["prompt"].to_list() == ["[x] is a checkbox", '[{"role": 1}]']
    # a JSON number or boolean beside text: polars made it the text "42" / "true", a prompt without a word
    for value, kind in ((42, "number"), (-1.5, "number"), (True, "boolean")):
        scalar = tmp_path / "scalar.jsonl"
        scalar.write_text(f'{{"prompt": "Say hi."}}\n{{"prompt": {json.dumps(value)}}}\n')
        with pytest.raises(PipelineError) as exc:
            read_prompts_source(scalar)
        assert str(exc.value) == (f'{scalar} line 2: `prompt` is {json.dumps(value)}, a JSON {kind}, not text; quote '
                                  f'it ("prompt": "{json.dumps(value)}") or remove the line')
    one_message = tmp_path / "one_message.jsonl"  # a forgotten [ ] around a conversation's one message
    one_message.write_text('{"prompt": "hello"}\n{"prompt": {"role": "user", "content": "hi there"}}\n')
    with pytest.raises(PipelineError) as exc:
        read_prompts_source(one_message)
    assert str(exc.value) == (f"{one_message} line 2: `prompt` is a JSON object, not text or a list of messages; a "
                              "conversation is a list: wrap the message in [ ]")
    quoted = tmp_path / "quoted.jsonl"
    quoted.write_text('{"prompt": "42"}\n{"prompt": "true"}\n{"prompt": "Say hi."}\n')  # text that looks like one
    assert read_prompts_source(quoted)["prompt"].to_list() == ["42", "true", "Say hi."]
    only_chat = tmp_path / "chat.jsonl"
    only_chat.write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    assert read_prompts_source(only_chat).schema["prompt"] != pl.String
