"""At home for TRL users: reward functions written for TRL run unchanged (keyword arguments, dataset columns by name,
`completion_ids`, conversational completions, None for "does not apply", async), TRL's own `trl.rewards` functions
included; and TRL's prompt-only dataset formats (standard and conversational; Parquet, JSONL, CSV, a `datasets`
save_to_disk directory) go through prepare with every extra column, which then reaches the rewards."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from conftest import repo_params_data
from stages.errors import PipelineError
from stages.io import read_table
from stages.params import RewardSpec, parse_params
from stages.prepare import prepare, prompt_id
from stages.rewards import build_reward, build_rewards, combine, compute_rewards
from stages.schemas import PROMPTS
from stages.score import reward_inputs

TRL_STYLE = textwrap.dedent('''
    import asyncio

    def reward_len(completions, **kwargs):                      # TRL's docs: only completions
        return [-abs(20 - len(c)) for c in completions]

    def accuracy(completions, solution, **kwargs):              # a dataset column by name
        contents = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if s is not None and s in c else (None if s is None else 0.0) for c, s in zip(contents, solution)]

    def token_count(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def shapes(prompts, completions, **kwargs):                 # what form did we get?
        return [float(isinstance(p, list)) + 10 * float(isinstance(c, list)) for p, c in zip(prompts, completions)]

    def no_kwargs(completions, solution):                       # no **kwargs: only what it names is passed
        return [float(len(s)) for s in solution]

    async def slow_len(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]
''')


@pytest.fixture
def mod(tmp_path, monkeypatch):
    (tmp_path / "trl_style.py").write_text(TRL_STYLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trl_style", raising=False)  # this test's file, not an earlier test's (gone)
    return "trl_style"


KEYS = [("a", 0), ("a", 1), ("b", 0)]
PROMPTS_TXT = ["2+2?", "2+2?", "capital of France?"]
COMPLETIONS = ["it is 4", "maybe 5", "Paris, of course"]
IDS = [[1, 2, 3], [4, 5], [6]]
MESSAGES = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}] for p in PROMPTS_TXT]


def call(spec_kwargs=None, conversational=False, **columns):
    return lambda name: build_reward(RewardSpec(name="r", function=f"trl_style:{name}", kwargs=spec_kwargs or {}))(
        PROMPTS_TXT, COMPLETIONS, completion_ids=IDS, messages=MESSAGES if conversational else None, **columns)


def test_trl_style_functions_run_unchanged(mod):
    assert call()("reward_len") == [-13, -13, -4]
    assert call(solution=["4", "4", "Paris"])("accuracy") == [1.0, 0.0, 1.0]
    assert call()("token_count") == [3.0, 2.0, 1.0]
    assert call(solution=["a", "bc", "def"])("no_kwargs") == [1.0, 2.0, 3.0]
    assert call()("slow_len") == [7.0, 7.0, 16.0]


def test_conversational_prompts_give_conversational_completions_unless_as_text(mod):
    assert call(conversational=True)("shapes") == [11.0] * 3  # prompts and completions as message lists
    assert call()("shapes") == [0.0] * 3
    assert call({"as_text": True}, conversational=True)("shapes") == [0.0] * 3
    got = call(conversational=True, solution=["4", "4", "Paris"])("accuracy")
    assert got == [1.0, 0.0, 1.0]  # the function read c[0]["content"]


def test_none_is_left_out_of_the_weighted_sum(mod):
    rewards = build_rewards([RewardSpec(name="acc", function="trl_style:accuracy", weight=2.0),
                             RewardSpec(name="len", function="trl_style:token_count", weight=0.5)])
    parts = compute_rewards(rewards, PROMPTS_TXT, COMPLETIONS, KEYS, completion_ids=IDS, solution=["4", None, "Rome"])
    assert np.ma.getmaskarray(parts["acc"]).tolist() == [False, True, False]
    assert combine(parts, {"acc": 2.0, "len": 0.5}).tolist() == [2.0 + 1.5, 1.0, 0.0 + 0.5]


@pytest.mark.parametrize("fn", ["no_kwargs", "accuracy"])  # with **kwargs too: TRL's own style
def test_a_missing_dataset_column_is_one_line(mod, fn):
    with pytest.raises(PipelineError, match=rf"reward `r`: 'trl_style:{fn}' needs `solution`, which the prompts "
                                            r"table lacks \(extra columns: answer\)"):
        call(answer=["x", "y", "z"])(fn)


def test_trl_rewards_think_format_reward_itself():
    pytest.importorskip("trl")
    reward = build_reward(RewardSpec(name="think", function="trl.rewards:think_format_reward"))
    completions = ["<think>\nreasoning\n</think>\nanswer", "no tags here", "<think>a</think>b"]
    assert reward(PROMPTS_TXT, completions, completion_ids=IDS, messages=MESSAGES) == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- datasets through prepare

ROWS = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Largest planet?", "Jupiter"),
        ("Boiling point of water in C?", "100"), ("3*3?", "9"), ("Color of the sky?", "blue"),
        ("What is 2+2?", "four")]  # the last repeats the first prompt: dropped, and counted


def standard() -> pl.DataFrame:
    return pl.DataFrame({"prompt": [p for p, _ in ROWS], "answer": [a for _, a in ROWS]})


def conversational() -> pl.DataFrame:
    msgs = [[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": p}] for p, _ in ROWS]
    return pl.DataFrame({"prompt": msgs, "solution": [a for _, a in ROWS]})


def write(df: pl.DataFrame, path, fmt: str):
    if fmt == "parquet":
        df.write_parquet(path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dicts()))
    elif fmt == "csv":
        df.write_csv(path)
    else:
        from datasets import Dataset

        Dataset.from_list(df.to_dicts()).save_to_disk(str(path))
        if fmt == "datasetdict":
            from datasets import DatasetDict, load_from_disk

            path2 = path.with_name(path.name + "_dict")
            DatasetDict({"train": load_from_disk(str(path))}).save_to_disk(str(path2))
            return path2
    return path


def prepared(tmp_path, tiny_model_dir, source, system_prompt=None):
    data = repo_params_data(base={"model": str(tiny_model_dir), "model_dir": str(tmp_path / "models" / "base")},
                            prepare={"prompts": str(source), "eval_size": 2, "max_prompt_tokens": 64,
                                     "system_prompt": system_prompt})
    params = parse_params(data)
    summary = prepare(params, tmp_path / "prepared")
    train = read_table(tmp_path / "prepared" / "train.parquet", PROMPTS)
    held = read_table(tmp_path / "prepared" / "eval.parquet", PROMPTS)
    return summary, pl.concat([train, held])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "dataset", "datasetdict"])
def test_standard_prompts_with_an_answer_column(tmp_path, tiny_model_dir, fmt):
    src = write(standard(), tmp_path / f"prompts.{fmt}", fmt)
    summary, table = prepared(tmp_path, tiny_model_dir, src, system_prompt="be brief")
    assert summary["duplicates_dropped"] == 1 and summary["extra_columns"] == ["answer"]
    assert not summary["conversational"] and table.height == 6
    got = dict(zip(table["prompt"], table["answer"]))
    assert got == {p: a for p, a in ROWS[:6]}  # each answer stays with its prompt; the duplicate's is not kept
    assert json.loads(table["messages"][0])[0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "dataset"])
def test_conversational_prompts_keep_their_turns_and_columns(tmp_path, tiny_model_dir, fmt):
    src = write(conversational(), tmp_path / f"prompts.{fmt}", fmt)
    summary, table = prepared(tmp_path, tiny_model_dir, src, system_prompt="ignored: the conversation has one")
    assert summary["conversational"] and summary["duplicates_dropped"] == 1 and summary["extra_columns"] == ["solution"]
    row = table.filter(pl.col("prompt") == "Capital of France?").row(0, named=True)
    assert json.loads(row["messages"]) == [{"role": "system", "content": "Answer in one word."},
                                           {"role": "user", "content": "Capital of France?"}]
    assert row["conversational"] and row["solution"] == "Paris"
    assert row["prompt_id"] == prompt_id(json.loads(row["messages"]))

    # the reward functions get the turns, the columns by name, and the completion token ids
    samples = pl.DataFrame({"prompt_id": [row["prompt_id"]], "sample_idx": [0], "prompt_text": ["t"],
                            "completion": ["Paris"], "completion_token_ids": [[5, 6]]})
    texts, inputs = reward_inputs(samples, table)
    assert texts == ["Capital of France?"] and inputs["solution"] == ["Paris"]
    assert inputs["messages"] == [json.loads(row["messages"])] and inputs["completion_ids"] == [[5, 6]]
    assert "conversational" not in inputs and "prompt" not in inputs


def test_a_datasets_own_prompt_id_and_messages_are_kept_aside(tmp_path, tiny_model_dir, caplog):
    """UltraFeedback-style columns named like prepare's own (prompt_id, messages) or like a reward argument
    (completion_ids) are kept as source_<name>: the prompt's hash, turns and sampled ids stay the pipeline's."""
    df = standard().with_columns(prompt_id=pl.lit("same"), messages=pl.lit("x"), completion_ids=pl.lit("y"))
    src = write(df, tmp_path / "prompts.jsonl", "jsonl")
    summary, table = prepared(tmp_path, tiny_model_dir, src)
    assert table["prompt_id"].n_unique() == table.height == 6
    assert table["prompt_id"].to_list() == [prompt_id(p) for p in table["prompt"]]
    assert summary["extra_columns"] == ["answer", "source_prompt_id", "source_messages", "source_completion_ids"]
    assert "kept as source_prompt_id, source_messages, source_completion_ids" in caplog.text
    samples = pl.DataFrame({"prompt_id": [table["prompt_id"][0]], "sample_idx": [0], "prompt_text": ["t"],
                            "completion": ["c"], "completion_token_ids": [[5, 6]]})
    _, inputs = reward_inputs(samples, table)
    assert inputs["completion_ids"] == [[5, 6]] and inputs["source_prompt_id"] == ["same"]
    with pytest.raises(PipelineError, match="columns `messages` and `source_messages` both present"):
        prepared(tmp_path, tiny_model_dir, write(df.with_columns(source_messages=pl.lit(1)), tmp_path / "p2.jsonl", "jsonl"))


def test_a_bad_conversation_is_one_line(tmp_path, tiny_model_dir):
    bad = pl.DataFrame({"prompt": [[{"role": "user", "text": "no content key"}], [{"role": "user", "content": "ok"}]]})
    src = write(bad, tmp_path / "bad.parquet", "parquet")
    with pytest.raises(PipelineError, match=r"row 0: each message needs `role` and `content` text"):
        prepared(tmp_path, tiny_model_dir, src)


def test_a_directory_that_is_not_a_saved_dataset(tmp_path, tiny_model_dir):
    (tmp_path / "notes").mkdir()
    with pytest.raises(PipelineError, match=r"not a `datasets` save_to_disk directory"):
        prepared(tmp_path, tiny_model_dir, tmp_path / "notes")


def test_score_leaves_none_rows_null_and_keeps_them(tmp_path, tiny_model_dir, mod):
    """A reward that does not apply to a completion (None) is null in score/<name>, not an invalid row."""
    from stages.models import load_causal_lm, load_tokenizer
    from stages.score import score_samples

    from conftest import make_samples_table

    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
    samples = make_samples_table(tok, [("p0", 0, "the movie", "great film", "stop"), ("p0", 1, "the movie", "dull", "stop")])
    prompts = pl.DataFrame({"prompt_id": ["p0"], "prompt": ["the movie"], "messages": ['[{"role": "user", "content": "the movie"}]'],
                            "conversational": [False], "solution": [None]}, schema_overrides={"solution": pl.String})
    sp = parse_params(repo_params_data(score={"rewards": [
        {"name": "acc", "function": "trl_style:accuracy"}, {"name": "len", "function": "length", "weight": 0.5,
                                                            "kwargs": {"min_words": 4}}]})).score
    out, stats = score_samples(samples, build_rewards(sp.rewards), model, model, tok, sp, prompts)
    assert out.height == 2 and stats["score/dropped"] == 0
    assert out["score/acc"].to_list() == [None, None] and out["score"].to_list() == pytest.approx([0.25, 0.125])
    assert math.isnan(stats["rewards/acc"]) or stats["rewards/acc"] is None


@pytest.mark.slow
def test_dvc_repro_on_a_reference_answer_task(tmp_path, tiny_model_dir):
    """A prompts file with an `answer` column, the documented `exact_match` reward and a TRL-style function that reads
    the same column: `dvc repro` runs end to end and the column reached every reward, in training and evaluation."""
    import yaml
    from project import BIN, make_project, run, run_env

    proj = make_project(tmp_path, tiny_model_dir, **{"train.rounds": 1, "train.eval_every": 1})
    words = ["great", "dull", "good", "slow", "wonderful", "terrible"]
    rows = [{"prompt": f"tell me about the movie {i}", "answer": words[i % len(words)]} for i in range(12)]
    (proj / "data" / "prompts" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (proj / "task_rewards.py").write_text(
        "def mentions(completions, answer, **kwargs):\n"
        "    return [float(a in c.split()) for c, a in zip(completions, answer)]\n")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["score"]["rewards"] = [{"name": "exact", "function": "exact_match", "kwargs": {"column": "answer"}},
                                  {"name": "mentions", "function": "task_rewards:mentions", "weight": 0.5},
                                  {"name": "length", "function": "length", "weight": 0.1, "kwargs": {"min_words": 3}}]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = run_env(tmp_path)
    run(["git", "add", "-A"], proj, env)
    run(["git", "commit", "-qm", "a reference-answer task"], proj, env)
    run([str(BIN / "dvc"), "repro"], proj, env)
    prepared = pl.read_parquet(proj / "data" / "prepared" / "train.parquet")
    assert "answer" in prepared.columns
    scores = pl.read_parquet(proj / "data" / "rounds" / "round=0000" / "scores.parquet")
    assert set(scores["score/exact"].unique().to_list()) <= {0.0, 1.0}
    assert set(scores["score/mentions"].unique().to_list()) <= {0.0, 1.0} and scores.height == 9
    m = json.loads((proj / "data" / "rounds" / "round=0000" / "manifest.json").read_text())["metrics"]
    assert "rewards/exact" in m and "eval/reward" in m
    assert json.loads((proj / "metrics" / "eval.json").read_text())["prompts"] == 4
