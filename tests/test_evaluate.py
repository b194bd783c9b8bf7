"""stages.evaluate: the win-rate by hand (ties half), the eval KL (exactly 0 against itself, a direct forward pass's
logp difference against another reference), the metrics of a table, and the policy/reference pairing by prompt."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import polars as pl
import pytest
import torch
from test_score import direct_logp

from conftest import make_samples_table, make_tiny_model
from stages.evaluate import (
    distinct_n,
    eval_metrics,
    evaluate_policy,
    examples_markdown,
    flat_metrics,
    paired_bootstrap,
    win_rate,
)
from stages.logprobs import PromptCache
from stages.models import load_causal_lm, load_tokenizer
from stages.params import RewardSpec
from stages.rewards import build_rewards
from stages.score import completion_inputs


def test_win_rate_by_hand():
    assert win_rate(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 0.0])) == pytest.approx(2.5 / 3)  # win, tie, win
    assert win_rate(np.array([0.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(0.25)
    assert np.isnan(win_rate(np.array([]), np.array([])))
    assert win_rate(np.array([2.0]), np.array([1.0])) == 1.0  # one prompt is a win-rate, not "no prompts"


ROWS = [("e0", 0, "write a short review of a film you liked", "the movie was great and wonderful", "stop"),
        ("e1", 0, "tell me about the best movie", "a dull film", "length"),
        ("e2", 0, "what did you think of the music", "i loved every minute of it", "stop")]
REF_ROWS = [("e0", 0, "write a short review of a film you liked", "a terrible plot", "stop"),
            ("e1", 0, "tell me about the best movie", "the acting was wonderful and good", "stop"),
            ("e2", 0, "what did you think of the music", "slow", "length")]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
    other = load_causal_lm(make_tiny_model(tmp_path_factory.mktemp("ref") / "m", seed=1), "float32", "cpu").eval()
    prompts = pl.DataFrame({"prompt_id": [r[0] for r in ROWS], "prompt": [r[2] for r in ROWS],
                            "messages": ["[]"] * 3})
    rewards = build_rewards([RewardSpec(name="len", function="length", kwargs={"min_words": 4})])
    return tok, policy, other, prompts, rewards


def test_eval_kl_is_zero_against_itself_and_a_forward_difference_against_another(setup):
    tok, policy, other, prompts, rewards = setup
    pol = make_samples_table(tok, ROWS)
    ref = make_samples_table(tok, REF_ROWS)
    ref_scores = np.array([0.1, 0.9, 0.5])
    table, m = evaluate_policy(pol, ref, ref_scores, rewards, policy, policy, tok, prompts)
    assert table["kl"].to_list() == [0.0, 0.0, 0.0] and m["kl"] == 0.0
    table, m = evaluate_policy(pol, ref, ref_scores, rewards, policy, other, tok, prompts)
    want = []
    for text, ids in zip(pol["prompt_text"], pol["completion_token_ids"]):
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        want.append(direct_logp(policy, p_ids, list(ids))[0] - direct_logp(other, p_ids, list(ids))[0])
    assert table["kl"].to_list() == pytest.approx(want, abs=1e-4)
    assert m["kl"] == pytest.approx(np.mean(want), abs=1e-4) and abs(m["kl"]) > 1e-3
    # the flow's way: the reference's prompt pass made once (from its own completions' prompts) and reused
    cache = PromptCache(other, completion_inputs(ref, tok)[0], tok.pad_token_id)
    cached, _ = evaluate_policy(pol, ref, ref_scores, rewards, policy, other, tok, prompts, ref_prompt_cache=cache)
    assert cached["kl"].to_list() == pytest.approx(want, abs=1e-4)
    # the policy's own completions paired with the reference's of the same prompt, scored by the task reward
    assert table["ref_completion"].to_list() == [r[3] for r in REF_ROWS]
    assert table["score"].to_list() == pytest.approx([1.0, 0.75, 1.0])  # words / min_words 4, capped at 1
    assert table["ref_score"].to_list() == [0.1, 0.9, 0.5]
    assert m["win_rate"] == pytest.approx(2 / 3) and m["reward"] == pytest.approx(2.75 / 3)
    assert m["ref_reward"] == pytest.approx(0.5) and m["prompts"] == 3
    assert table.columns == ["prompt_id", "prompt_text", "completion", "num_tokens", "finish_reason", "policy_version",
                             "score", "logp_policy", "logp_ref", "kl", "ref_completion", "ref_num_tokens", "ref_score"]
    assert table["prompt_text"].to_list() == pol["prompt_text"].to_list()
    assert table["finish_reason"].to_list() == ["stop", "length", "stop"]
    # the reference's rows are found by prompt id, in any order; a prompt without one keeps its row, unpaired
    table, m = evaluate_policy(pol, ref[::-1].head(2), np.array([0.5, 0.9]), rewards, policy, policy, tok, prompts)
    assert table["prompt_id"].to_list() == ["e0", "e1", "e2"]
    assert table["ref_completion"].to_list() == [None, REF_ROWS[1][3], REF_ROWS[2][3]]
    assert table["ref_score"].to_list() == [None, 0.9, 0.5]


def test_eval_metrics_of_a_table():
    t = pl.DataFrame({"score": [1.0, 0.0, 0.5, 0.5], "ref_score": [0.0, 0.0, 1.0, 0.5], "kl": [0.1, 0.3, 0.2, 0.0],
                      "num_tokens": [10, 20, 30, 40], "ref_num_tokens": [5, 5, 5, 5],
                      # policy bigrams: (a b) (b c) | (a b) (b c) | (a b) | -  -> 2 distinct of 5
                      # reference: (x y) | (y z) | (x y) (y x) | (no reference completion) -> 3 distinct of 4
                      "completion": ["a b c", "A b c", "a b", "a"], "ref_completion": ["x y", "y z", "x y x", None]})
    m = eval_metrics(t)
    assert (m["distinct_2"], m["ref_distinct_2"]) == (pytest.approx(2 / 5), pytest.approx(3 / 4))
    assert m["distinct_2_ratio"] == pytest.approx((2 / 5) / (3 / 4))
    assert m["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4) and m["kl"] == pytest.approx(0.15)
    assert (m["mean_length"], m["ref_mean_length"], m["prompts"]) == (25.0, 5.0, 4)
    assert torch.isclose(torch.tensor(m["reward"]), torch.tensor(0.5))
    # no bigram at all (one-word completions): distinct-2 is 0, and the ratio against it is undefined: null, so
    # metrics/eval.json stays strict JSON (no NaN), and the examples page says n/a
    one_word = eval_metrics(t.with_columns(ref_completion=pl.lit("yes")))
    assert one_word["ref_distinct_2"] == 0.0 and one_word["distinct_2_ratio"] is None
    json.loads(json.dumps(one_word), parse_constant=lambda c: pytest.fail(f"{c} in the metrics"))
    assert "| distinct_2_ratio | n/a |" in examples_markdown(t.with_columns(ref_completion=pl.lit("yes")), one_word, 0)
    assert distinct_n([]) == 0.0 and distinct_n(["word"]) == 0.0


def test_paired_bootstrap_by_hand():
    """95 % percentile intervals whose resampling distribution can be written down."""
    ref = np.array([0.1, 0.5, -0.2, 0.0])
    # every prompt gains 0.3: every resample has gain 0.3 and win-rate 1; equal scores are ties (win 0.5)
    assert paired_bootstrap(ref + 0.3, ref) == {"reward_gain_ci95": [pytest.approx(0.3)] * 2, "win_rate_ci95": [1.0, 1.0]}
    assert paired_bootstrap(ref, ref)["win_rate_ci95"] == [0.5, 0.5]
    # gains [0, 0, 0, 4]: a resample's mean gain is k (k ~ Binomial(4, 1/4) copies of the 4): P(k=0) = 81/256 > 2.5 %,
    # P(k >= 3) = 13/256 = 5.1 % > 2.5 % > P(k = 4) = 0.4 %, so the interval is [0, 3]; the three
    # zero gains are ties (0.5 each), so a resample's win-rate is 0.5 + k/8: [0.5, 0.875]
    pol = np.array([0.0, 0.0, 0.0, 4.0])
    zero = np.zeros(4)
    assert paired_bootstrap(pol, zero) == {"reward_gain_ci95": [0.0, 3.0], "win_rate_ci95": [0.5, 0.875]}
    # the pairing matters: policy and reference move together, so the gain is exactly 1 whatever their spread
    spread = np.array([-5.0, 0.0, 5.0, 10.0])
    assert paired_bootstrap(spread + 1, spread)["reward_gain_ci95"] == [pytest.approx(1.0)] * 2
    # every prompt can be drawn, the first as the others: the same gains in another order, the same interval
    assert paired_bootstrap(pol[::-1].copy(), zero) == paired_bootstrap(pol, zero)
    # the interval's ends are the 2.5th and 97.5th percentiles: gains 1 on 4 of 7 prompts, 0 (ties) on 3, so a
    # resample's gain is k/7 with k ~ Binomial(7, 4/7): P(k <= 1) = 2.74 % (the 2.5th percentile is k = 1, a 3.5th
    # would be k = 2) and P(k = 7) = 1.99 % (the 97.5th is k = 6, a 98.5th would be k = 7); win-rate 0.5 + k/14
    # (enough resamples that the empirical tails sit well inside those margins)
    got = paired_bootstrap(np.array([1.0] * 4 + [0.0] * 3), np.zeros(7), resamples=200_000)
    assert got == {"reward_gain_ci95": [pytest.approx(1 / 7), pytest.approx(6 / 7)],
                   "win_rate_ci95": [pytest.approx(8 / 14), pytest.approx(13 / 14)]}
    # fixed seed: the same numbers every time, and the defaults the README states (2000 resamples, seed 0)
    rnd = np.random.default_rng(1).normal(size=(2, 50))
    assert paired_bootstrap(*rnd) == paired_bootstrap(*rnd) == paired_bootstrap(*rnd, resamples=2000, seed=0)
    assert paired_bootstrap(*rnd) != paired_bootstrap(*rnd, resamples=2001)
    assert paired_bootstrap(*rnd) != paired_bootstrap(*rnd, seed=1)


def test_eval_metrics_carry_their_intervals_and_the_prompt_count():
    t = pl.DataFrame({"score": [0.9, 0.1, 0.6, 0.4, 0.8], "ref_score": [0.2, 0.3, 0.6, 0.1, 0.5],
                      "kl": [0.1] * 5, "num_tokens": [4] * 5, "ref_num_tokens": [4] * 5,
                      "completion": ["a b c d"] * 5, "ref_completion": ["w x y z"] * 5})
    m = eval_metrics(t)
    assert m["prompts"] == 5
    for name in ("reward_gain", "win_rate"):
        low, high = m[f"{name}_ci95"]
        assert low <= m[name] <= high and low < high
    flat = flat_metrics(m)
    assert flat["win_rate_ci95_low"] == m["win_rate_ci95"][0] and "win_rate_ci95" not in flat
    assert flat["win_rate_ci95_high"] == m["win_rate_ci95"][1]
    assert {k: v for k, v in flat.items() if "_ci95" not in k} == {k: v for k, v in m.items() if "_ci95" not in k}
    assert flat_metrics({"kl": 0.5, "ci": (1, 2)}, "eval/") == {"eval/kl": 0.5, "eval/ci_low": 1, "eval/ci_high": 2}


def test_examples_show_the_metrics_then_the_top_prompts_side_by_side():
    from stages.evaluate import examples_markdown

    table = pl.DataFrame({"prompt_id": ["a", "b", "c"], "score": [0.2, 0.9, 0.5], "ref_score": [0.1, 0.3, 0.7],
                          "prompt_text": ["first\nprompt", "second", "third"],
                          "completion": ["pol a", "pol b\nline 2", "pol c"], "ref_completion": ["ref a", None, " ref\nc "]})
    md = examples_markdown(table, {"win_rate": 0.5, "prompts": 3}, 2)
    assert "| win_rate | 0.5000 |" in md and "| prompts | 3 |" in md
    heads = [line for line in md.splitlines() if line.startswith("## prompt")]
    assert heads == ["## prompt `b` (policy +0.900 vs reference +0.300)",
                     "## prompt `c` (policy +0.500 vs reference +0.700)"]  # the n best by the policy's score
    assert "**Policy:** pol b line 2" in md and "**Reference:** " in md.splitlines()  # newlines folded; None -> ''
    assert "**Policy:** pol c" in md and "**Reference:** ref c" in md and "pol a" not in md
    assert md.endswith("\n") and examples_markdown(table, {}, 0).count("## prompt") == 0
    one = examples_markdown(table.head(1), {"kl": 0.25}, 1)
    assert one == ("# Evaluation: policy vs reference\n\n| metric | value |\n|---|---|\n| kl | 0.2500 |\n\n"
                   "## prompt `a` (policy +0.200 vs reference +0.100)\n\n**Prompt:** first prompt\n\n"
                   "**Policy:** pol a\n\n**Reference:** ref a\n\n")
    long = table.head(1).with_columns(pl.lit("x" * 400 + " the end  \n").alias("prompt_text"))
    assert "**Prompt:** " + ("x" * 400 + " the end")[-300:] + "\n" in examples_markdown(long, {}, 1)  # its last 300 chars


def test_generate_one_samples_one_greedy_completion_per_prompt_at_the_eval_length(setup, tiny_model_dir):
    from conftest import repo_params
    from stages.evaluate import generate_one
    from stages.sample import make_sampler

    import json

    tok, _, _, prompts, _ = setup
    prompts = prompts.with_columns(pl.Series("messages", [json.dumps([{"role": "user", "content": t}])
                                                          for t in prompts["prompt"]]))
    params = repo_params(base={"model_dir": str(tiny_model_dir)}, evaluate={"max_completion_length": 5},
                         sample={"dtype": "float32", "max_model_len": 128, "batch_size": 2, "k": 4})
    sampler = make_sampler(str(tiny_model_dir), params, backend="hf")
    try:
        a = generate_one(sampler, tok, prompts, params, 3, 7)
        b = generate_one(sampler, tok, prompts, params, 4, 7)  # greedy: the seed does not matter
    finally:
        sampler.close()
    assert a["prompt_id"].to_list() == prompts["prompt_id"].to_list()  # k=1, not sample.k
    assert set(a["policy_version"]) == {7} and set(a["sample_idx"]) == {0}
    assert all(1 <= n <= 5 for n in a["num_tokens"]) and 5 in a["num_tokens"].to_list()
    assert a["completion"].to_list() == b["completion"].to_list()



def test_sampled_evaluation_draws_from_the_seeds_of_round_minus_one(setup, tiny_model_dir):
    """evaluate.greedy = false: each prompt's completion comes from prompt_seed(seed, -1, prompt_id), a stream no
    training round (round index >= 0) ever draws from; the same seed gives the same completions."""
    import json

    from conftest import repo_params
    from stages.evaluate import generate_one
    from stages.sample import generation_config, make_sampler, prompt_seed, tokenize_prompts

    tok, _, _, prompts, _ = setup
    prompts = prompts.with_columns(pl.Series("messages", [json.dumps([{"role": "user", "content": t}])
                                                          for t in prompts["prompt"]]))
    params = repo_params(base={"model_dir": str(tiny_model_dir)}, evaluate={"max_completion_length": 6, "greedy": False},
                         sample={"dtype": "float32", "max_model_len": 128, "batch_size": 2, "k": 4, "temperature": 1.0})
    cfg = generation_config(params.sample, k=1, max_tokens=6)
    _, ids = tokenize_prompts(tok, prompts)
    sampler = make_sampler(str(tiny_model_dir), params, backend="hf")
    try:
        got = generate_one(sampler, tok, prompts, params, 3, 7)["completion_token_ids"].to_list()
        again = generate_one(sampler, tok, prompts, params, 3, 7)["completion_token_ids"].to_list()
        draws = {r: [c[0].token_ids for c in sampler.generate(ids, cfg, [prompt_seed(3, r, p) for p in prompts["prompt_id"]])]
                 for r in (-1, 0, 1, -2)}
    finally:
        sampler.close()
    assert got == again == draws[-1]
    assert all(got != draws[r] for r in (0, 1, -2))

def test_task_scores_give_rewards_the_prompts_columns_and_name_a_bad_row(setup, tmp_path, monkeypatch):
    from stages.errors import PipelineError
    from stages.evaluate import task_scores

    tok, _, _, prompts, _ = setup
    df = make_samples_table(tok, [("e0", 0, "a prompt", "paris", "stop"), ("e1", 0, "b prompt", "rome", "stop")])
    qs = pl.DataFrame({"prompt_id": ["e1", "e0"], "prompt": ["b", "a"], "messages": ["[]"] * 2,
                       "answer": ["london", "paris"]})  # joined by prompt_id, not by position
    exact = build_rewards([RewardSpec(name="m", function="exact_match", weight=2.0)])
    assert task_scores(df, exact, qs).tolist() == [2.0, 0.0]
    (tmp_path / "bad_reward_t.py").write_text("def f(prompts, completions, **kw):\n"
                                              "    return [1.0 if c == 'paris' else 'oops' for c in completions]\n"
                                              "def g(prompts, completions, **kw):\n"
                                              "    return [float(p == 'b') for p in prompts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_reward_t", raising=False)
    by_prompt = build_rewards([RewardSpec(name="p", function="bad_reward_t:g")])
    assert task_scores(df, by_prompt, qs).tolist() == [0.0, 1.0]  # the user's raw prompt of each row, by prompt_id
    bad = build_rewards([RewardSpec(name="b", function="bad_reward_t:f")])
    with pytest.raises(PipelineError, match=r"reward `b` returned 'oops' \(str\) for prompt_id=e1 sample_idx=0;"):
        task_scores(df, bad, qs)


def test_exact_sampler_logprobs_replace_the_policy_pass_and_rewards_see_the_prompts(setup):
    tok, policy, other, prompts, _ = setup
    pol = make_samples_table(tok, ROWS)
    ref = make_samples_table(tok, REF_ROWS)
    qs = prompts.with_columns(pl.Series("answer", [r[3] for r in ROWS[:2]] + ["no"]))  # 2 of 3 exact matches
    exact = build_rewards([RewardSpec(name="m", function="exact_match")])
    table, m = evaluate_policy(pol, ref, np.zeros(3), exact, policy, other, tok, qs, sampler_exact=True)
    assert table["score"].to_list() == [1.0, 1.0, 0.0] and m["reward"] == pytest.approx(2 / 3)
    sampler = [-1.5 * n for n in pol["num_tokens"]]  # the table's sampler logprobs: -1.5 per token
    assert table["logp_policy"].to_list() == pytest.approx(sampler)
    want_ref = [direct_logp(other, tok(t, add_special_tokens=False)["input_ids"], list(ids))[0]
                for t, ids in zip(pol["prompt_text"], pol["completion_token_ids"])]
    assert table["logp_ref"].to_list() == pytest.approx(want_ref, abs=1e-4)
    assert table["kl"].to_list() == pytest.approx([s - r for s, r in zip(sampler, want_ref)], abs=1e-4)
    # sampled at another temperature: the engine's raw logprobs are not the KL's, both passes are of logits / T
    table, _ = evaluate_policy(pol, ref, np.zeros(3), exact, policy, other, tok, qs, sampler_exact=True,
                               temperature=0.5)
    want = [direct_logp(m_, tok(t, add_special_tokens=False)["input_ids"], list(ids), 0.5)[0]
            for m_ in (policy, other) for t, ids in zip(pol["prompt_text"], pol["completion_token_ids"])]
    assert table["logp_policy"].to_list() == pytest.approx(want[:3], abs=1e-4)
    assert table["logp_ref"].to_list() == pytest.approx(want[3:], abs=1e-4)


def test_the_stage_without_a_trained_policy_says_to_train_or_pass_policy(tmp_path):
    """`python -m stages.evaluate` before any training: the checkpoint dir is missing, and the fix is to train (or to
    evaluate another dir), not `stages.prepare`, which does not make it."""
    import yaml
    from conftest import repo_params_data

    from stages.errors import PipelineError
    from stages.evaluate import main
    from stages.prepare import prompts_frame

    data = repo_params_data()
    data["train"]["checkpoint_dir"] = str(tmp_path / "policy")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    prompts_frame(["Say hi.", "Say bye."], None).write_parquet(tmp_path / "eval.parquet")
    with pytest.raises(PipelineError, match=r"^train.checkpoint_dir: model directory .*policy does not exist; train "
                                            r"first \(`dvc repro train` or `python -m flows.train`\), or evaluate "
                                            r"another dir with --policy$"):
        main(["--params", str(tmp_path / "params.yaml"), "--prompts", str(tmp_path / "eval.parquet")])


def _two_held_out(setup, tmp_path, monkeypatch, module: str, for_rome: str):
    """Two held-out completions ('paris', 'rome') and a reward `n` that gives `for_rome` for 'rome', 1.0 else."""
    tok, _, _, _, _ = setup
    df = make_samples_table(tok, [("e0", 0, "a prompt", "paris", "stop"), ("e1", 0, "b prompt", "rome", "stop")])
    qs = pl.DataFrame({"prompt_id": ["e0", "e1"], "prompt": ["a", "b"], "messages": ["[]"] * 2})
    (tmp_path / f"{module}.py").write_text("def f(prompts, completions, **kw):\n"
                                           f"    return [{for_rome} if c == 'rome' else 1.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return df, qs, build_rewards([RewardSpec(name="n", function=f"{module}:f")])


def test_a_nan_reward_in_the_evaluation_follows_score_on_invalid(tmp_path, monkeypatch, setup):
    """A reward's NaN/inf on a held-out completion: `error` stops with the row, as in training; `drop` leaves that
    prompt out of the metrics (counted as `dropped`), so metrics/eval.json stays strict JSON; no prompt left stops."""
    from stages.errors import PipelineError
    from stages.evaluate import task_scores

    df, qs, nan = _two_held_out(setup, tmp_path, monkeypatch, "nan_reward_t", "float('nan')")
    with pytest.raises(PipelineError, match=r"^reward `n` gave NaN/inf for held-out prompt_id=e1 in the evaluation; "
                                            r"fix the reward or set score.on_invalid: drop"):
        task_scores(df, nan, qs)
    got = task_scores(df, nan, qs, on_invalid="drop")
    assert got[0] == 1.0 and np.isnan(got[1])

    t = pl.DataFrame({"score": [1.0, float("nan"), 0.5, 0.2], "ref_score": [0.0, 0.3, float("inf"), 0.4],
                      "kl": [0.1, 0.2, 0.3, 0.4], "num_tokens": [10, 20, 30, 40], "ref_num_tokens": [5] * 4,
                      "completion": ["a b", "c d", "e f", "g h"], "ref_completion": ["x y"] * 4,
                      "prompt_id": list("abcd"), "prompt_text": ["p"] * 4})
    m = eval_metrics(t)
    assert m == eval_metrics(t[[0, 3]]) | {"dropped": 2} and m["prompts"] == 2
    json.loads(json.dumps(m), parse_constant=lambda c: pytest.fail(f"{c} in the metrics"))
    assert "nan" not in examples_markdown(t, m, 4).split("## prompt", 1)[1]  # the examples show scored prompts only
    with pytest.raises(PipelineError, match="every one of the 2 held-out prompts has a NaN/inf reward, or none, for"):
        eval_metrics(t[[1, 2]])


def test_a_held_out_completion_no_reward_applies_to_is_left_out_not_scored_0(tmp_path, monkeypatch, setup, caplog):
    """Every reward returned None for a held-out completion: its score is NaN (unscored, as in training), so
    `eval_metrics` leaves its prompt out (`dropped`), under either `score.on_invalid`, with a warning counting it."""
    from stages.evaluate import task_scores

    df, qs, rewards = _two_held_out(setup, tmp_path, monkeypatch, "none_reward_t", "None")
    for on_invalid in ("error", "drop"):
        with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
            got = task_scores(df, rewards, qs, on_invalid=on_invalid)
        assert got[0] == 1.0 and np.isnan(got[1])
        assert caplog.records[-1].getMessage() == ("1 of 2 held-out completions got None from every reward: their "
                                                   "prompts are left out of the metrics; make some reward apply to them")
    with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
        task_scores(df, rewards, qs, side="the reference's")  # the evaluation says whose they are
    assert caplog.records[-1].getMessage().startswith("1 of 2 held-out completions (the reference's) got None")
