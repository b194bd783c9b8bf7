"""stages.io: validated Parquet round trips, one-line errors naming file and column, atomic writes, permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import polars as pl
import pytest

from stages.errors import PipelineError
from stages.io import atomic_path, read_json, read_table, write_json, write_table, write_text
from stages.schemas import ADVANTAGES, PROMPTS, SAMPLES, SCORES


def samples_frame(n: int = 4) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_id": [f"p{i // 2}" for i in range(n)],
            "sample_idx": [i % 2 for i in range(n)],
            "prompt_text": [f"<user> prompt {i // 2} <assistant> " for i in range(n)],
            "completion": [f"completion {i}" for i in range(n)],
            "completion_token_ids": [[i, i + 1, 2] for i in range(n)],
            "sampler_logprobs": [[-0.5, -1.25, -0.125] for _ in range(n)],
            "num_tokens": [3] * n,
            "finish_reason": ["stop" if i % 2 else "length" for i in range(n)],
            "policy_version": [0] * n,
        },
        schema=SAMPLES,
    )


def scores_frame(dtype=pl.Float64) -> pl.DataFrame:
    cols = {c: [0.5, -1.0] for c in ("score", "logp_policy", "logp_ref", "kl", "rlhf_reward")}
    return pl.DataFrame(
        {"prompt_id": ["a", "a"], "sample_idx": [0, 1], **cols},
        schema={"prompt_id": pl.String, "sample_idx": pl.Int32, **{c: dtype for c in cols}},
    )


def tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- round trips -------------------------------------------------------------------------------------------


def test_samples_round_trip(tmp_path):
    df = samples_frame()
    dest = write_table(df, tmp_path / "samples.parquet", SAMPLES)
    assert dest == tmp_path / "samples.parquet"
    back = read_table(dest, SAMPLES)
    assert back.schema == df.schema
    assert back.equals(df)
    assert tmp_files(tmp_path) == []


def test_round_trip_without_schema(tmp_path):
    df = samples_frame()
    assert read_table(write_table(df, tmp_path / "s.parquet")).equals(df)


def test_write_creates_parent_dirs(tmp_path):
    dest = tmp_path / "round=0001" / "deep" / "samples.parquet"
    write_table(samples_frame(), dest, SAMPLES)
    assert dest.is_file()


def test_write_casts_to_the_contract_types(tmp_path):
    df = samples_frame().with_columns(
        pl.col("sample_idx").cast(pl.Int64),
        pl.col("num_tokens").cast(pl.Int64),
        pl.col("completion_token_ids").cast(pl.List(pl.Int64)),
        pl.col("sampler_logprobs").cast(pl.List(pl.Float64)),
    )
    write_table(df, tmp_path / "s.parquet", SAMPLES)
    raw = pl.read_parquet(tmp_path / "s.parquet")
    assert {c: raw.schema[c] for c in SAMPLES} == {c: (t if isinstance(t, pl.DataType) else t()) for c, t in SAMPLES.items()}


def test_extra_columns_are_kept(tmp_path):
    df = scores_frame().with_columns(pl.lit(0.25).alias("score/sentiment"))
    back = read_table(write_table(df, tmp_path / "scores.parquet", SCORES), SCORES)
    assert back["score/sentiment"].to_list() == [0.25, 0.25]


def test_float32_accepted_for_float64_columns(tmp_path):
    path = tmp_path / "scores.parquet"
    scores_frame(pl.Float32).write_parquet(path)  # a user's table, written without the contract
    back = read_table(path, SCORES)
    assert back.schema["score"] == pl.Float64 and back.schema["rlhf_reward"] == pl.Float64
    assert back["score"].to_list() == [0.5, -1.0]


def test_ints_accepted_for_int_columns(tmp_path):
    path = tmp_path / "adv.parquet"
    pl.DataFrame(
        {"prompt_id": ["a"], "sample_idx": [0], "rlhf_reward": [1.0], "baseline": [0.0], "advantage": [1.0], "estimator": ["rloo"]},
        schema={"prompt_id": pl.String, "sample_idx": pl.UInt8, "rlhf_reward": pl.Float64, "baseline": pl.Float64,
                "advantage": pl.Float64, "estimator": pl.String},
    ).write_parquet(path)
    assert read_table(path, ADVANTAGES).schema["sample_idx"] == pl.Int32


def test_jsonl_and_csv_are_read(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "p.csv").write_text('prompt,other\n"a, with comma",1\nb,2\n')
    assert read_table(tmp_path / "p.jsonl")["prompt"].to_list() == ["a", "b"]
    assert read_table(tmp_path / "p.csv")["prompt"].to_list() == ["a, with comma", "b"]


def test_jsonl_and_csv_column_types_come_from_every_row(tmp_path):
    """Not from the first 100 rows (polars' default): a column that starts late is kept, null-first or int-then-float
    columns are read whole."""
    rows = [{"prompt": f"p{i}", "n": 1 if i < 120 else 1.5, "z": None if i < 120 else "x",
             **({"answer": f"a{i}"} if i >= 120 else {})} for i in range(150)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = read_table(tmp_path / "p.jsonl")
    assert (df["answer"][125], df["n"][130], df["z"][140], df["answer"][0]) == ("a125", 1.5, "x", None)
    (tmp_path / "p.csv").write_text("prompt,ans\n" + "".join(f"p{i},{i if i < 120 else f'x{i}'}\n" for i in range(150)))
    assert read_table(tmp_path / "p.csv")["ans"][130] == "x130"


# --- validation errors -------------------------------------------------------------------------------------


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def test_read_missing_column(tmp_path):
    path = tmp_path / "samples.parquet"
    samples_frame().drop("finish_reason").write_parquet(path)
    with pytest.raises(PipelineError) as exc:
        read_table(path, SAMPLES)
    msg = one_line(exc)
    assert msg.startswith(f"{path}: ") and "missing column" in msg and "finish_reason" in msg
    assert "stages.prepare" not in msg  # (only a prompts table gets that hint)


def test_a_raw_prompts_file_given_for_a_prepared_table_says_how_to_prepare_it(tmp_path):
    from stages.schemas import PROMPTS

    path = tmp_path / "my_prompts.jsonl"
    path.write_text('{"prompt": "tell me a story"}\n')
    with pytest.raises(PipelineError) as exc:
        read_table(path, PROMPTS)
    msg = one_line(exc)
    assert msg.startswith(f"{path}: missing column(s)") and msg.endswith(
        "; a stage takes the prepared prompts: python -m stages.prepare (dvc repro prepare) writes "
        "data/prepared/train.parquet and eval.parquet from your prompts file")


def test_read_wrong_type_column(tmp_path):
    path = tmp_path / "samples.parquet"
    samples_frame().with_columns(pl.col("num_tokens").cast(pl.String)).write_parquet(path)
    with pytest.raises(PipelineError) as exc:
        read_table(path, SAMPLES)
    msg = one_line(exc)
    assert msg.startswith(f"{path}: ") and "`num_tokens`" in msg and "String" in msg and "Int32" in msg


def test_read_wrong_list_inner_type(tmp_path):
    path = tmp_path / "samples.parquet"
    samples_frame().with_columns(pl.col("sampler_logprobs").cast(pl.List(pl.String))).write_parquet(path)
    with pytest.raises(PipelineError, match=r"`sampler_logprobs`"):
        read_table(path, SAMPLES)


def test_float_column_rejects_text(tmp_path):
    path = tmp_path / "scores.parquet"
    scores_frame().with_columns(pl.col("kl").cast(pl.String)).write_parquet(path)
    with pytest.raises(PipelineError, match=r"column `kl` has type String, expected Float64"):
        read_table(path, SCORES)


def test_write_validates_before_writing(tmp_path):
    dest = tmp_path / "prompts.parquet"
    with pytest.raises(PipelineError) as exc:
        write_table(pl.DataFrame({"prompt_id": ["a"], "prompt": ["x"]}), dest, PROMPTS)
    msg = one_line(exc)
    assert str(dest) in msg and "messages" in msg
    assert list(tmp_path.iterdir()) == []


def test_read_missing_file(tmp_path):
    with pytest.raises(PipelineError) as exc:
        read_table(tmp_path / "nope.parquet", SAMPLES)
    assert "nope.parquet" in one_line(exc) and "not found" in str(exc.value)


def test_read_unsupported_suffix(tmp_path):
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(PipelineError, match=r"unsupported file type '.xlsx'"):
        read_table(tmp_path / "t.xlsx")


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet PAR1", "truncated"])
def test_read_corrupt_parquet(tmp_path, content):
    path = tmp_path / "samples.parquet"
    if content == "truncated":
        samples_frame().write_parquet(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(PipelineError) as exc:
        read_table(path, SAMPLES)
    msg = one_line(exc)
    assert msg.startswith(f"{path}: cannot be read")


def test_read_corrupt_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(PipelineError) as exc:
        read_table(path)
    assert one_line(exc).startswith(f"{path}: cannot be read")


@pytest.mark.parametrize("lines, where", [
    (['{"prompt": "a"}', "", '{"prompt": "b"}', '{"prompt: "c"}'], "line 4: Expecting ':' delimiter (column 12)"),
    (['{"prompt": "a"}', '["b"]'], 'line 2: a JSON list, not an object ({"prompt": ...})'),
    (['{"prompt": "a"}', '{"prompt": "\udcff"}'], "line 2: 'utf-8' codec can't decode byte 0xff in position 12"),
    (['{"prompt": "a"}', "[" * 100_000], "line 2: maximum recursion depth exceeded"),  # not a traceback
])
def test_a_corrupt_jsonl_line_is_named(tmp_path, lines, where):
    """polars names a character offset, not the line: the error adds the first line that is not a JSON object."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))  # \udcff: the byte 0xff
    with pytest.raises(PipelineError) as exc:
        read_table(path)
    msg = one_line(exc)
    assert msg.startswith(f"{path}: cannot be read (") and f"; {where}" in msg, msg


@pytest.mark.parametrize("name, content", [("p.jsonl", ""), ("p.jsonl", "\n \n"), ("p.csv", "")])
def test_an_empty_text_table_says_so_with_the_fix(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PipelineError) as exc:
        read_table(path)
    assert one_line(exc).startswith(f"{path}: the file is empty; add rows (")


def test_read_error_with_empty_message(tmp_path, monkeypatch):
    path = tmp_path / "samples.parquet"
    samples_frame().write_parquet(path)

    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(pl, "read_parquet", fail)
    with pytest.raises(PipelineError, match=r"cannot be read \(OSError"):
        read_table(path, SAMPLES)


# --- atomic writes -----------------------------------------------------------------------------------------


def test_failed_table_write_keeps_the_previous_file(tmp_path, monkeypatch):
    dest = tmp_path / "samples.parquet"
    old = samples_frame(4)
    write_table(old, dest, SAMPLES)
    before = dest.read_bytes()

    def partial_then_fail(self, file, *args, **kwargs):
        Path(file).write_bytes(b"PAR1 half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", partial_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(samples_frame(8), dest, SAMPLES)
    monkeypatch.undo()

    assert dest.read_bytes() == before
    assert read_table(dest, SAMPLES).equals(old)
    assert tmp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.parquet"]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(self, file, *args, **kwargs):
        Path(file).write_bytes(b"PAR1")
        raise KeyboardInterrupt  # also cleaned up: not only Exception subclasses

    monkeypatch.setattr(pl.DataFrame, "write_parquet", fail)
    with pytest.raises(KeyboardInterrupt):
        write_table(samples_frame(), tmp_path / "samples.parquet", SAMPLES)
    assert list(tmp_path.iterdir()) == []


def test_failed_json_write_keeps_the_previous_file(tmp_path, monkeypatch):
    dest = tmp_path / "manifest.json"
    write_json({"round": 1, "ok": True}, dest)
    before = dest.read_text()

    def boom(*args, **kwargs):
        raise ValueError("cannot serialise")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(ValueError, match="cannot serialise"):
        write_json({"round": 2}, dest)
    monkeypatch.undo()

    assert dest.read_text() == before
    assert read_json(dest) == {"round": 1, "ok": True}
    assert tmp_files(tmp_path) == []


def test_atomic_path_cleans_up_on_error(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")
            tmp.write_text("new, half")
            raise RuntimeError("crash")
    assert dest.read_text() == "old"
    assert tmp_files(tmp_path) == []


def test_atomic_path_leaves_no_temporary_file_on_ctrl_c_and_keeps_it_a_ctrl_c(tmp_path):
    """Ctrl-C while handling a full disk is still a Ctrl-C (exit 130, not the disk-full line), and the temporary file
    goes as on any error."""
    dest = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise KeyboardInterrupt from None
    assert not dest.exists() and tmp_files(tmp_path) == []


def test_overwrite_replaces(tmp_path):
    dest = tmp_path / "s.parquet"
    write_table(samples_frame(2), dest, SAMPLES)
    write_table(samples_frame(6), dest, SAMPLES)
    assert read_table(dest, SAMPLES).height == 6
    assert tmp_files(tmp_path) == []


# --- JSON / text -------------------------------------------------------------------------------------------


def test_write_json_format(tmp_path):
    dest = write_json({"b": 1, "a": {"path": Path("x/y")}}, tmp_path / "m.json")
    text = dest.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted keys
    assert json.loads(text) == {"a": {"path": "x/y"}, "b": 1}  # default=str


def test_write_text(tmp_path):
    dest = write_text("hello\n", tmp_path / "r" / "report.md")
    assert dest.read_text() == "hello\n" and tmp_files(dest.parent) == []


def test_read_json_errors(tmp_path):
    with pytest.raises(PipelineError, match=r"not found"):
        read_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n  oops}')
    with pytest.raises(PipelineError) as exc:
        read_json(bad)
    msg = one_line(exc)
    assert msg.startswith(f"{bad}: not valid JSON") and "line 2" in msg


# --- permissions -------------------------------------------------------------------------------------------


def test_written_files_have_normal_permissions(tmp_path):
    expected = 0o666 & ~current_umask()
    files = [
        write_table(samples_frame(), tmp_path / "s.parquet", SAMPLES),
        write_json({"a": 1}, tmp_path / "m.json"),
        write_text("x", tmp_path / "r.md"),
    ]
    for f in files:
        assert mode_of(f) == expected, f"{f.name}: {oct(mode_of(f))}"
        if current_umask() & 0o044 == 0:
            assert mode_of(f) != 0o600  # not mkstemp's private mode


def test_a_round_sampled_without_logprobs_round_trips_with_null_sampler_logprobs(tmp_path):
    """A training round that does not use the engine's logprobs (a bf16 engine) asks for none: the samples table holds
    null there, and it writes and reads back under the contract (`stages.loop.steps.sample_round`)."""
    from stages.sample import Completion
    from stages.sample import samples_frame as build

    prompts = pl.DataFrame({"prompt_id": ["a", "b"]})
    groups = [[Completion("x y", [5, 6], None, "stop"), Completion("z", [7], None, "length")]] * 2
    df = build(prompts, ["<a>", "<b>"], groups, 3)
    path = tmp_path / "samples.parquet"
    write_table(df, path, SAMPLES)
    back = read_table(path, SAMPLES)
    assert back["sampler_logprobs"].null_count() == 4 and back["sampler_logprobs"].dtype == pl.List(pl.Float32)
    assert back["completion_token_ids"].to_list() == [[5, 6], [7], [5, 6], [7]]


def test_a_json_write_failing_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    """A JSON write that fails after writing part of the file (a full disk) leaves the previous file whole: it
    wrote a temporary file."""
    dest = tmp_path / "manifest.json"
    write_json({"round": 1}, dest)
    real = Path.write_text

    def torn(self, data, *a, **k):
        real(self, data[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(Exception):
        write_json({"round": 2}, dest)
    monkeypatch.undo()
    assert json.loads(dest.read_text()) == {"round": 1}
