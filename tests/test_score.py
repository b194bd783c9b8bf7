"""stages.score: kl_and_reward by hand, score_samples on a hand-built samples table for the tiny model (weights,
KL against a direct transformers forward pass, invalid rewards), sequence_logprobs against an unpadded forward
pass for every batch size, and the CLI (output contract, bad input exits 2 and keeps the old file)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from conftest import make_samples_table, make_tiny_model, repo_params_data
from stages.errors import PipelineError
from stages.io import read_table, write_table
from stages.logprobs import PromptCache, sequence_logprobs
from stages.models import load_causal_lm, load_tokenizer
from stages.params import RewardSpec, ScoreParams, parse_params
from stages.rewards import build_rewards
from stages.schemas import SAMPLES, SCORES, sample_digest
from stages.score import kl_and_reward, optimizer_steps, reward_inputs, score_samples, score_stats

REPO = Path(__file__).resolve().parents[1]

# (prompt_id, sample_idx, user prompt, completion words, finish_reason); "stop" rows end with <eos>.
ROWS = [
    ("p0", 0, "write a short review of a film you liked", "the movie was great", "stop"),
    ("p0", 1, "write a short review of a film you liked", "a dull film with a terrible plot and the acting", "length"),
    ("p1", 0, "tell me about the best movie", "i loved it", "stop"),
    ("p1", 1, "tell me about the best movie", "the story is slow but the ending is good", "length"),
    ("p2", 0, "what did you think of the music and the cast", "good", "stop"),
    ("p2", 1, "what did you think of the music and the cast", "", "stop"),  # EOS only
]


# --- helpers -----------------------------------------------------------------------------------------------


def make_samples(tokenizer, rows=ROWS) -> pl.DataFrame:
    return make_samples_table(tokenizer, rows)


def direct_logp(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0
                ) -> tuple[float, list[float]]:
    """One unpadded forward pass over prompt + completion; sum of log_softmax(logits / temperature) at the
    completion tokens."""
    if not completion_ids:
        return 0.0, []
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    P = len(prompt_ids)
    per_token = [float(logp[P - 1 + j, t]) for j, t in enumerate(completion_ids)]
    return sum(per_token), per_token


def direct_for(model, tokenizer, samples: pl.DataFrame, temperature: float = 1.0) -> list[float]:
    out = []
    for text, comp in zip(samples["prompt_text"], samples["completion_token_ids"]):
        out.append(direct_logp(model, tokenizer(text, add_special_tokens=False)["input_ids"], list(comp),
                               temperature)[0])
    return out


def write_reward_module(tmp_path: Path, monkeypatch, source: str) -> str:
    """Write `source` as a uniquely named module in tmp_path, importable; returns the module name."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def score_params(rewards: list[dict], **kw) -> ScoreParams:
    """fp32 passes unless a test asks for another dtype: these tests hold the numbers to direct fp32 forwards (the
    default, auto, is bf16 where native; test_precision pins its error)."""
    kw.setdefault("dtype", "float32")
    return ScoreParams(rewards=[RewardSpec(**r) for r in rewards], **kw)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """(tokenizer, policy, ref with another seed, plain transformers copies of both for the direct computation)."""
    from transformers import AutoModelForCausalLM

    ref_dir = make_tiny_model(tmp_path_factory.mktemp("ref") / "model", seed=1)
    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir).eval()
    ref = load_causal_lm(ref_dir).eval()
    plain_policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain_ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    return tok, policy, ref, plain_policy, plain_ref


# --- kl_and_reward by hand ---------------------------------------------------------------------------------


def test_kl_and_reward_sequence_level():
    score = np.array([1.0, 0.5, -2.0])
    lp = np.array([-10.0, -4.0, -7.5])
    lr = np.array([-12.0, -3.0, -7.5])
    kl, reward = kl_and_reward(score, lp, lr, np.array([5, 2, 3]), np.array([False, True, False]), beta=0.1)
    assert kl.tolist() == pytest.approx([2.0, -1.0, 0.0])
    assert reward.tolist() == pytest.approx([1.0 - 0.2, 0.5 + 0.1, -2.0])


def test_kl_and_reward_token_level():
    score = np.array([1.0, 0.5, -2.0])
    lp = np.array([-10.0, -4.0, -7.5])
    lr = np.array([-12.0, -3.0, -6.0])
    n = np.array([4, 2, 0])  # 0 tokens: divided by 1, not 0
    kl, reward = kl_and_reward(score, lp, lr, n, np.zeros(3, dtype=bool), beta=0.5, kl_level="token")
    assert kl.tolist() == pytest.approx([0.5, -0.5, -1.5])
    assert reward.tolist() == pytest.approx([1.0 - 0.25, 0.5 + 0.25, -2.0 + 0.75])
    assert np.isfinite(kl).all()


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_missing_eos_penalty_only_on_truncated_rows(level):
    score = np.array([1.0, 1.0, 0.0, 0.0])
    lp = np.array([-3.0, -3.0, -2.0, -2.0])
    lr = np.array([-4.0, -4.0, -2.0, -2.0])
    n = np.array([2, 2, 1, 1])
    truncated = np.array([False, True, False, True])
    kl0, base = kl_and_reward(score, lp, lr, n, truncated, beta=0.1, kl_level=level)
    kl1, pen = kl_and_reward(score, lp, lr, n, truncated, beta=0.1, kl_level=level, missing_eos_penalty=0.75)
    assert kl1.tolist() == kl0.tolist()  # the penalty never touches the KL
    assert (base - pen).tolist() == pytest.approx([0.0, 0.75, 0.0, 0.75])
    for off in (None, 0.0):  # no penalty configured (or zero): truncated rows unchanged
        assert kl_and_reward(score, lp, lr, n, truncated, 0.1, level, off)[1].tolist() == base.tolist()


# --- score_samples -----------------------------------------------------------------------------------------

USER_REWARD = """
def chars(prompts, completions, bonus=0.0):
    return [len(c) + bonus for c in completions]

def nan_on(prompts, completions, word="good"):
    return [float("nan") if word in c.split() else 1.0 for c in completions]

def only_short(prompts, completions):
    # applies only to completions of at most 3 words (None elsewhere)
    return [float(len(c.split())) if len(c.split()) <= 3 else None for c in completions]

def word_on(prompts, completions):
    return ["good" if "good" in c.split() else 1.0 for c in completions]

def with_columns(prompts, completions, **columns):
    # the raw user prompt (not the chat-templated text) and the prompts table's extra column
    return [float(p.startswith("tell")) + float(len(a)) for p, a in zip(prompts, columns["answer"])]
"""


def test_score_samples_weights_and_kl_zero_when_ref_is_policy(models, tmp_path, monkeypatch):
    tok, policy, _, plain_policy, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, USER_REWARD)
    sp = score_params(
        [
            {"name": "chars", "function": f"{mod}:chars", "weight": 0.5, "kwargs": {"bonus": 1.0}},
            {"name": "len", "function": "length", "weight": -2.0, "kwargs": {"min_words": 4}},
        ],
        beta=0.3, batch_size=4,
    )
    samples = make_samples(tok)
    t0 = time.perf_counter()
    out, stats = score_samples(samples, build_rewards(sp.rewards), policy, policy, tok, sp)
    elapsed = time.perf_counter() - t0
    # the two phases' own times: each within the call's wall time, together not more than it
    assert 0 <= stats["time/reward_s"] <= elapsed and 0 <= stats["time/logprobs_s"] <= elapsed
    assert stats["time/reward_s"] + stats["time/logprobs_s"] <= elapsed

    chars = [len(r[3]) + 1.0 for r in ROWS]
    length = [min(len(r[3].split()) / 4, 1.0) for r in ROWS]
    assert out["score/chars"].to_list() == pytest.approx(chars)
    assert out["score/len"].to_list() == pytest.approx(length)
    assert out["score"].to_list() == pytest.approx([0.5 * c - 2.0 * w for c, w in zip(chars, length)])
    # ref is policy: kl is exactly 0 and rlhf_reward is exactly the score
    assert out["kl"].to_list() == [0.0] * len(ROWS)
    assert out["logp_ref"].to_list() == out["logp_policy"].to_list()
    assert out["rlhf_reward"].to_list() == out["score"].to_list()
    assert out["logp_policy"].to_list() == pytest.approx(direct_for(plain_policy, tok, samples), abs=1e-4)
    # keys and bookkeeping columns carried over, in order; the table satisfies the contract
    assert out.select("prompt_id", "sample_idx", "num_tokens", "finish_reason").equals(
        samples.select("prompt_id", "sample_idx", "num_tokens", "finish_reason")
    )
    write_table(out, tmp_path / "scores.parquet", SCORES)
    assert read_table(tmp_path / "scores.parquet", SCORES).height == len(ROWS)
    assert stats["score/dropped"] == 0
    assert stats["reward"] == pytest.approx(float(np.mean(out["score"].to_numpy())))
    assert stats["kl"] == 0.0
    assert stats["rewards/chars"] == pytest.approx(float(np.mean(chars)))


@pytest.mark.parametrize("kl_level,temperature", [("sequence", 1.0), ("token", 1.0), ("sequence", 0.7)])
def test_score_samples_with_a_different_ref_matches_direct_forward(models, kl_level, temperature):
    """Both logprobs are of the distribution the completions were sampled from: the logits divided by
    sample.temperature (as TRL), so the KL and the loss are about the policy that sampled."""
    tok, policy, ref, plain_policy, plain_ref = models
    sp = score_params([{"name": "length", "function": "length", "weight": 1.0}], beta=0.05, batch_size=4,
                      kl_level=kl_level, missing_eos_penalty=0.25)
    samples = make_samples(tok)
    out, stats = score_samples(samples, build_rewards(sp.rewards), policy, ref, tok, sp, temperature=temperature)

    lp = direct_for(plain_policy, tok, samples, temperature)
    lr = direct_for(plain_ref, tok, samples, temperature)
    if temperature != 1.0:  # not the untempered ones
        assert np.abs(np.asarray(lp) - np.asarray(direct_for(plain_policy, tok, samples))).max() > 0.1
    assert out["logp_policy"].to_list() == pytest.approx(lp, abs=1e-4)
    assert out["logp_ref"].to_list() == pytest.approx(lr, abs=1e-4)
    kl = out["logp_policy"].to_numpy() - out["logp_ref"].to_numpy()
    if kl_level == "token":
        kl = kl / np.maximum(samples["num_tokens"].to_numpy(), 1)
    assert out["kl"].to_list() == pytest.approx(kl.tolist(), abs=1e-12)
    assert np.abs(out["kl"].to_numpy()).max() > 1e-3  # the models really differ
    truncated = (samples["finish_reason"] == "length").to_numpy()
    expected = out["score"].to_numpy() - 0.05 * out["kl"].to_numpy() - 0.25 * truncated
    assert out["rlhf_reward"].to_list() == pytest.approx(expected.tolist(), abs=1e-12)
    assert stats["kl"] == pytest.approx(float(out["kl"].mean()))
    assert out["sample_digest"].to_list() == sample_digest(samples).to_list()  # what the update checks


def test_score_samples_passes_raw_prompts_and_extra_columns(models, tmp_path, monkeypatch):
    tok, policy, _, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, USER_REWARD)
    sp = score_params([{"name": "cols", "function": f"{mod}:with_columns"}])
    samples = make_samples(tok)
    prompts = pl.DataFrame({
        "prompt_id": ["p2", "p0", "p1"],  # not in samples order: joined on prompt_id
        "prompt": [ROWS[4][2], ROWS[0][2], ROWS[2][2]],
        "messages": ["[]", "[]", "[]"],
        "answer": ["abc", "", "x"],
    })
    out, _ = score_samples(samples, build_rewards(sp.rewards), policy, policy, tok, sp, prompts=prompts)
    assert out["score/cols"].to_list() == [0.0, 0.0, 2.0, 2.0, 3.0, 3.0]


TRL_EXTRAS_REWARD = """
def curriculum(completions, trainer_state, log_metric, log_extra, **kwargs):
    progress = trainer_state.global_step / trainer_state.max_steps
    log_metric("progress", progress)
    log_extra("chars", [len(c) for c in completions])
    log_extra("mixed", [1 if i % 2 == 0 else 0.5 for i in range(len(completions))])  # ints and floats: a float column
    return [progress] * len(completions)
"""


def test_trl_extra_arguments_reach_a_reward_function(models, tmp_path, monkeypatch):
    """TRL passes every reward function `trainer_state`, `log_metric` and `log_extra`: the run's progress in optimizer
    steps, a metric averaged into the round's stats, and a per-completion column in the scores table."""
    tok, policy, _, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, TRL_EXTRAS_REWARD)
    sp = score_params([{"name": "cur", "function": f"{mod}:curriculum"}])
    samples = make_samples(tok)
    out, stats = score_samples(samples, build_rewards(sp.rewards), policy, policy, tok, sp, steps=(3, 12))
    assert out["score/cur"].to_list() == [0.25] * samples.height and stats["log/progress"] == 0.25
    assert out["extra/chars"].to_list() == [len(c) for c in samples["completion"]]
    assert out["extra/mixed"].to_list() == [1.0 if i % 2 == 0 else 0.5 for i in range(samples.height)]
    params = parse_params(repo_params_data(train={"rounds": 6}, update={"num_mini_batches": 2}))
    assert optimizer_steps(params, 2) == (4, 12) and optimizer_steps(params, 2, 10) == (4, 20)  # --rounds 10
    params = parse_params(repo_params_data(train={"rounds": 6}, update={"num_mini_batches": 2, "num_ppo_epochs": 3}))
    assert optimizer_steps(params, 2) == (12, 36)  # 2 mini-batches x 3 epochs a round


def test_completions_no_reward_applies_to_are_counted_in_a_warning(models, tmp_path, monkeypatch, caplog):
    tok, policy, _, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, "def none(completions, **kw):\n    return [None] * len(completions)\n")
    sp = score_params([{"name": "n", "function": f"{mod}:none"}, {"name": "v", "function": "vader"}])
    samples = make_samples(tok)
    with caplog.at_level(logging.WARNING, logger="stages.score"):
        score_samples(samples, build_rewards(sp.rewards), policy, policy, tok, sp)
    assert "completions got None from every reward" not in caplog.text  # vader applies to every row
    sp = score_params([{"name": "n", "function": f"{mod}:none"}])
    with caplog.at_level(logging.WARNING, logger="stages.score"):
        out, _ = score_samples(samples, build_rewards(sp.rewards), policy, policy, tok, sp)
    assert caplog.records[-1].getMessage() == (
        f"{samples.height} of {samples.height} completions got None from every reward: unscored (score and "
        "rlhf_reward null, left out of their prompt's baseline, advantage 0); make some reward apply to them")
    assert out["score"].to_list() == [None] * samples.height and out["rlhf_reward"].to_list() == [None] * samples.height
    assert out["kl"].null_count() == 0  # the KL is still the completion's
    # one rank of several counts its own share of the round: the warning says whose count it is
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.WARNING, logger="stages.score"):
        score_samples(samples, build_rewards(sp.rewards), policy, policy, tok, sp)
    assert caplog.records[-1].getMessage() == (
        f"{samples.height} of {samples.height} completions got None from every reward: unscored (score and "
        "rlhf_reward null, left out of their prompt's baseline, advantage 0) (rank 1's share; the round's totals are "
        "in its metrics); make some reward apply to them")


def test_sequence_logprobs_match_direct_forward_for_any_batch_size(models):
    tok, policy, _, plain_policy, _ = models
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [
        enc("<user> write a short review of a film you liked <eos> <assistant>"),
        enc("<user> hi <eos> <assistant>"),
        enc("<assistant>"),  # one-token prompt
        enc("<user> tell me about the best movie you have seen <eos> <assistant>"),
        enc("<user> the plot <eos> <assistant>"),
    ]
    completions = [
        enc("the movie was great <eos>"),
        [],  # an empty completion (no tokens at all): logprob 0
        enc("a dull film with a terrible plot and the acting was wonderful i loved every minute of it"),
        enc("<eos>"),
        enc("good"),
    ]
    expected = [direct_logp(plain_policy, p, c) for p, c in zip(prompts, completions)]
    for bs in (1, 2, 3, 5, 16):
        sums, per_token = sequence_logprobs(policy, prompts, completions, tok.pad_token_id, batch_size=bs)
        assert sums == pytest.approx([e[0] for e in expected], abs=1e-4), bs
        for got, (_, want), c in zip(per_token, expected, completions):
            assert len(got) == len(c)
            assert got == pytest.approx(want, abs=1e-4), bs
    assert sums[1] == 0.0 and per_token[1] == []
    # the lm_head runs only on the columns that predict a completion token: on the prompts' cache, one column after
    # each distinct prompt, then C - 1 per row (the last column would predict past the completion); C in the plain layout
    rows: list[int] = []
    hook = policy.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    C = max(len(c) for c in completions)
    try:
        sequence_logprobs(policy, prompts, completions, tok.pad_token_id, batch_size=16)
        assert rows == [len(prompts), len(prompts) * (C - 1)]
        rows.clear()
        sums, _ = sequence_logprobs(policy, prompts, completions, tok.pad_token_id, batch_size=16, share=False)
        assert rows == [len(prompts) * C]
        assert sums == pytest.approx([e[0] for e in expected], abs=1e-4)
    finally:
        hook.remove()
    # the empty completion alone in its batch
    assert sequence_logprobs(policy, [prompts[1]], [[]], tok.pad_token_id) == ([0.0], [[]])
    # a prompt cache made once (the held-out evaluation's reference): only the completions run; same numbers, for
    # any batch size and for rows that repeat a prompt; a prompt it was not made for is an error, as is another dtype
    cache = PromptCache(policy, prompts[1:] + prompts[:1], tok.pad_token_id, batch_size=2)
    twice = prompts + [prompts[0]]
    again = completions + [enc("bad")]
    for bs in (1, 3, 16):
        sums, per_token = sequence_logprobs(policy, twice, again, tok.pad_token_id, batch_size=bs, prompt_cache=cache)
        assert sums[:5] == pytest.approx([e[0] for e in expected], abs=1e-4), bs
        assert sums[5] == pytest.approx(direct_logp(plain_policy, prompts[0], again[5])[0], abs=1e-4)
        assert per_token[2] == pytest.approx(expected[2][1], abs=1e-4)
    with pytest.raises(ValueError, match="not made for"):
        sequence_logprobs(policy, [enc("<user> <user> <user> <eos> <assistant>")], [enc("good")], tok.pad_token_id, prompt_cache=cache)
    with pytest.raises(ValueError, match="made in float32"):
        sequence_logprobs(policy, prompts, completions, tok.pad_token_id, dtype="bfloat16", prompt_cache=cache)
    # the keys and values are that model's: another model with this cache is an error, not mixed numbers
    with pytest.raises(ValueError, match="another model"):
        sequence_logprobs(plain_policy, prompts, completions, tok.pad_token_id, prompt_cache=cache)


def test_the_plain_layout_needs_a_prompt_token(models):
    """Column P - 1 predicts the first completion token: prompts that are all empty are an error, not a wrapped index."""
    from stages.logprobs import completion_logits

    tok, policy, *_ = models
    with pytest.raises(ValueError, match="every prompt is empty"):
        completion_logits(policy, [[]], [[5, 6]], tok.pad_token_id)
    logits, targets, mask = completion_logits(policy, [[7]], [[5, 6]], tok.pad_token_id)
    assert logits.shape[:2] == (1, 2) and logits.is_contiguous() and targets.tolist() == [[5, 6]]


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float32, 0.6),
                                               (torch.bfloat16, 1.5)])
def test_selective_logprobs_equal_the_full_log_softmax_and_its_gradient(dtype, temperature, monkeypatch):
    """The blockwise fp32 logprob of each target (what every logprob pass uses) equals
    log_softmax(logits.float() / temperature) gathered, its entropy the full one, and its gradient the full one's,
    in the logits' dtype; with blocks of 4 rows for 6 x 5 positions (the last block partial), on a non-contiguous
    view (a caller's slice of wider logits). With and without the entropy, the logprobs are the same to the bit;
    the logits themselves are left as they were."""
    import stages.logprobs as lp_mod

    monkeypatch.setattr(lp_mod, "_block_rows", lambda vocab, device: 4)
    gen = torch.Generator().manual_seed(0)
    leaf = (torch.randn(6, 6, 300, generator=gen) * 4).to(dtype).requires_grad_()
    logits = leaf[:, :-1, :]  # non-contiguous
    targets = torch.randint(0, 300, (6, 5), generator=gen)
    weights = torch.randn(6, 5, generator=gen)
    before = logits.detach().clone()
    logp, ent = lp_mod.selective_logprobs(logits, targets, with_entropy=True, temperature=temperature)
    assert logp.dtype == torch.float32 and not ent.requires_grad
    assert torch.equal(logits.detach(), before)
    (logp * weights).sum().backward()
    got_grad, leaf.grad = leaf.grad, None
    full = torch.log_softmax(logits.float() / temperature, dim=-1)
    want = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()
    assert torch.allclose(logp, want, atol=1e-5)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-4)
    assert got_grad.dtype == dtype and not got_grad[:, -1].any()
    assert torch.allclose(got_grad.float(), leaf.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    plain, none = lp_mod.selective_logprobs(logits, targets, temperature=temperature)
    assert none is None
    # the entropy's single exp pass leaves the logprobs (what the update trains on) the same to the bit
    assert torch.equal(plain, logp)


def test_prompt_cache_refuses_a_sliding_window_model():
    """A sliding-window layer keeps only its last window's keys: a cache of longer prompts would not line up with
    their mask, so it is refused (the flow's evaluation then runs the full reference pass); shorter prompts are fine."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=3, max_position_embeddings=64)
    model = MistralForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="sliding window"):
        PromptCache(model, [[1, 2, 3, 4, 5, 6], [1, 2]], 0)
    prompts, completions = [[1, 2], [3]], [[4, 5, 6], [7]]
    cache = PromptCache(model, prompts, 0)
    assert sequence_logprobs(model, prompts, completions, 0, prompt_cache=cache)[0] == pytest.approx(
        sequence_logprobs(model, prompts, completions, 0)[0], abs=1e-5)


def test_on_invalid_error_names_reward_and_first_key(models, tmp_path, monkeypatch):
    tok, policy, _, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, USER_REWARD)
    # "good" is a word of rows 3 (p1/1) and 4 (p2/0): the first one is named
    sp = score_params([{"name": "length", "function": "length"}, {"name": "picky", "function": f"{mod}:nan_on"}])
    with pytest.raises(PipelineError) as exc:
        score_samples(make_samples(tok), build_rewards(sp.rewards), policy, policy, tok, sp)
    assert str(exc.value) == ("reward `picky` gave NaN/inf for prompt_id=p1 sample_idx=1; fix the reward or set "
                              "score.on_invalid: drop to exclude such rows")
    # a value that is not a number at all is named by its row the same way
    sp = score_params([{"name": "wordy", "function": f"{mod}:word_on"}])
    with pytest.raises(PipelineError, match=r"reward `wordy` returned 'good' \(str\) for prompt_id=p1 sample_idx=1;"):
        score_samples(make_samples(tok), build_rewards(sp.rewards), policy, policy, tok, sp)


def test_score_stats_by_hand():
    """The round's reward statistics (TRL's names) of a scores table: means, the sample std (n - 1), the dropped
    rows, a component's mean over the rows it applied to, and nan for a component that never applied."""
    out = pl.DataFrame({"prompt_id": ["p", "p", "q"], "num_tokens": [2, 3, 5], "logp_policy": [-1.0, -2.0, -3.0],
                        "logp_ref": [-1.5, -2.0, -3.1], "score": [1.0, 2.0, 4.0], "rlhf_reward": [0.5, 1.0, 2.0],
                        "kl": [0.1, 0.2, 0.3],
                        "score/a": [1.0, None, 3.0], "score/b": pl.Series([None, None, None], dtype=pl.Float64)})
    got = score_stats(out, 5, ["a", "b"], 0.25, 1.5)
    assert set(got) == {"reward", "reward_std", "rlhf_reward", "kl", "score/dropped", "score/unscored", "time/reward_s",
                        "time/logprobs_s", "rewards/a", "rewards/b", "rewards/a/mean", "rewards/a/std",
                        "rewards/b/mean", "rewards/b/std", "frac_reward_zero_std", "kl/per_token"}
    # TRL's names: a reward's mean and (n - 1) std over the rows it applied to; prompts of >= 2 completions whose
    # KL-penalised rewards are all equal (p: 0.5 and 1.0, not); the policy/reference log-ratio per completion token
    # (TRL's first-order `kl`: (0.5 + 0 + 0.1) / 10 tokens, whatever the `kl` column's level)
    assert got["rewards/a/mean"] == 2.0 and got["rewards/a/std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(got["rewards/b/mean"]) and math.isnan(got["rewards/b/std"])
    assert got["frac_reward_zero_std"] == 0.0 and got["kl/per_token"] == pytest.approx(0.6 / 10)
    assert score_stats(out.with_columns(pl.col("kl") / pl.col("num_tokens")), 3, [], 0, 0)["kl/per_token"] == \
        pytest.approx(0.06)  # kl_level: token changes `kl`, not this
    same = out.with_columns(pl.Series("rlhf_reward", [3.0, 3.0, 4.0]), pl.Series("prompt_id", ["p", "p", "p"]))
    assert score_stats(same, 3, [], 0.0, 0.0)["frac_reward_zero_std"] == 0.0  # 3, 3, 4: one group, not flat
    assert score_stats(same.head(2), 2, [], 0.0, 0.0)["frac_reward_zero_std"] == 1.0
    assert math.isnan(score_stats(out.tail(1), 1, [], 0.0, 0.0)["frac_reward_zero_std"])  # no group of 2
    # by prompt: p flat (3, 3), q not (1, 2): half the prompts; a reward that applied to one row has no std
    two = out.vstack(out.tail(1).with_columns(pl.Series("rlhf_reward", [1.0]))).with_columns(
        pl.Series("rlhf_reward", [3.0, 3.0, 2.0, 1.0]))
    assert score_stats(two, 4, [], 0.0, 0.0)["frac_reward_zero_std"] == 0.5
    one = score_stats(out.with_columns(pl.Series("score/a", [None, None, 3.0])), 3, ["a"], 0.0, 0.0)
    assert one["rewards/a/mean"] == 3.0 and math.isnan(one["rewards/a/std"])
    empty = score_stats(out.clear(), 0, [], 0.0, 0.0)  # no rows: no tokens, no KL per token
    assert math.isnan(empty["kl/per_token"]) and math.isnan(empty["frac_reward_zero_std"])
    assert got["reward"] == pytest.approx(7 / 3) and got["reward_std"] == pytest.approx(math.sqrt(7 / 3))
    assert got["rlhf_reward"] == pytest.approx(3.5 / 3) and got["kl"] == pytest.approx(0.2)
    assert (got["score/dropped"], got["time/reward_s"], got["time/logprobs_s"]) == (2, 0.25, 1.5)
    assert got["rewards/a"] == 2.0 and math.isnan(got["rewards/b"])
    assert score_stats(out.head(2), 2, [], 0.0, 0.0)["reward_std"] == pytest.approx(math.sqrt(0.5))  # two rows: spread
    one = score_stats(out.head(1), 1, ["a"], 0.0, 0.0)
    assert one["reward_std"] == 0.0 and one["reward"] == 1.0 and one["score/dropped"] == 0
    none = score_stats(out.clear(), 4, ["a"], 0.0, 0.0)  # every row dropped: no means, no spread
    assert [math.isnan(none[k]) for k in ("reward", "rlhf_reward", "kl", "rewards/a")] == [True] * 4
    assert none["reward_std"] == 0.0 and none["score/dropped"] == 4
    # unscored rows (null: no reward applied) are counted, and left out of the reward's mean and std, as TRL does
    un = out.with_columns(pl.Series("score", [1.0, None, 4.0]), pl.Series("rlhf_reward", [0.5, None, 2.0]))
    got = score_stats(un, 3, [], 0.0, 0.0)
    assert (got["score/unscored"], got["reward"], got["rlhf_reward"]) == (1, 2.5, 1.25)
    assert got["reward_std"] == pytest.approx(math.sqrt(4.5)) and got["kl"] == pytest.approx(0.2)
    assert math.isnan(got["frac_reward_zero_std"])  # p's null is not a completion to compare: no prompt has 2
    nulls = score_stats(un.with_columns(pl.Series("score", [None] * 3, pl.Float64),
                                        pl.Series("rlhf_reward", [None] * 3, pl.Float64)), 3, [], 0.0, 0.0)
    assert nulls["score/unscored"] == 3 and math.isnan(nulls["reward"]) and math.isnan(nulls["rlhf_reward"])


def test_on_invalid_drop_drops_the_row_and_counts_it(models, tmp_path, monkeypatch, caplog):
    tok, policy, ref, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, USER_REWARD)
    sp = score_params(
        [{"name": "length", "function": "length"}, {"name": "picky", "function": f"{mod}:nan_on", "kwargs": {"word": "loved"}}],
        on_invalid="drop",
    )
    samples = make_samples(tok)
    with caplog.at_level(logging.WARNING, logger="stages.score"):
        out, stats = score_samples(samples, build_rewards(sp.rewards), policy, ref, tok, sp)
    assert [r.getMessage() for r in caplog.records] == [
        "score.on_invalid=drop: 1 of 6 completions dropped (NaN/inf reward)"]
    assert stats["score/dropped"] == 1
    assert list(zip(out["prompt_id"], out["sample_idx"])) == [(r[0], r[1]) for r in ROWS if r[:2] != ("p1", 0)]
    for col in ("score", "logp_policy", "logp_ref", "kl", "rlhf_reward"):
        assert np.isfinite(out[col].to_numpy()).all(), col
    assert stats["reward"] == pytest.approx(float(out["score"].mean()))
    assert math.isfinite(stats["rlhf_reward"]) and math.isfinite(stats["kl"])


# --- CLI ---------------------------------------------------------------------------------------------------


def cli_params(tmp_path: Path, model_dir: Path) -> Path:
    data = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    data["base"].update(model_dir=str(model_dir), device="cpu", threads=1)
    data["score"]["rewards"] = [{"name": "length", "function": "length", "weight": 1.0, "kwargs": {"min_words": 4}}]
    data["score"]["batch_size"] = 4
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.score", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_cli_writes_scores(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    samples = make_samples(tok)
    src, out = tmp_path / "samples.parquet", tmp_path / "scores.parquet"
    write_table(samples, src, SAMPLES)
    params = cli_params(tmp_path, tiny_model_dir)
    proc = cli("--params", str(params), "--samples", str(src), "--out", str(out), "--policy", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    got = read_table(out, SCORES)  # validates the contract
    assert got.height == len(ROWS) and "score/length" in got.columns
    assert got["kl"].to_list() == [0.0] * len(ROWS)  # policy is the base: ref is the same model
    assert got["score"].to_list() == pytest.approx([min(len(r[3].split()) / 4, 1.0) for r in ROWS])


def test_cli_names_the_field_a_missing_model_dir_came_from(tiny_model_dir, tmp_path):
    """Without --ref the reference is score.ref_model (or base.model_dir): a missing one is named by that field, not
    by a flag that was not given."""
    src = tmp_path / "samples.parquet"
    write_table(make_samples(load_tokenizer(tiny_model_dir)), src, SAMPLES)
    params = cli_params(tmp_path, tiny_model_dir)
    data = yaml.safe_load(params.read_text())
    data["score"]["ref_model"] = str(tmp_path / "gone")
    params.write_text(yaml.safe_dump(data))
    proc = cli("--params", str(params), "--samples", str(src), "--out", str(tmp_path / "o.parquet"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: score.ref_model: model directory {tmp_path / 'gone'} does not exist"), proc.stderr
    proc = cli("--params", str(params), "--samples", str(src), "--out", str(tmp_path / "o.parquet"),
               "--ref", str(tmp_path / "other"))
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --ref: model directory {tmp_path / 'other'} "), \
        proc.stderr


def test_cli_bad_samples_exits_2_and_keeps_the_old_file(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    src, out = tmp_path / "samples.parquet", tmp_path / "scores.parquet"
    make_samples(tok).drop("completion_token_ids").write_parquet(src)
    out.write_bytes(b"previous round's scores")
    before = os.stat(out).st_mtime_ns
    params = cli_params(tmp_path, tiny_model_dir)
    proc = cli("--params", str(params), "--samples", str(src), "--out", str(out), "--policy", str(tiny_model_dir))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "completion_token_ids" in lines[0] and str(src) in lines[0]
    assert out.read_bytes() == b"previous round's scores" and os.stat(out).st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "samples.parquet", "scores.parquet"]


def test_cli_without_prompts_says_to_pass_them_when_a_reward_needs_a_column(tiny_model_dir, tmp_path):
    """The stage alone has no prompts table unless --prompts gives one: a reward naming a column says so."""
    tok = load_tokenizer(tiny_model_dir)
    src, out = tmp_path / "samples.parquet", tmp_path / "scores.parquet"
    write_table(make_samples(tok), src, SAMPLES)
    params = cli_params(tmp_path, tiny_model_dir)
    data = yaml.safe_load(params.read_text())
    data["score"]["rewards"] = [{"name": "em", "function": "exact_match", "weight": 1.0, "kwargs": {"column": "answer"}}]
    params.write_text(yaml.safe_dump(data))
    proc = cli("--params", str(params), "--samples", str(src), "--out", str(out), "--policy", str(tiny_model_dir))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after the stage's INFO lines
    assert line.startswith("error: ") and "Traceback" not in proc.stderr
    assert "needs the reference column `answer`" in line and line.endswith(
        "here: pass the prompts table the samples came from with --prompts (data/prepared/train.parquet, or "
        "eval.parquet for held-out samples)")
    assert not out.exists()


def test_cli_that_drops_every_completion_stops_and_writes_nothing(tiny_model_dir, tmp_path):
    """`score.on_invalid: drop` with a reward NaN for every completion: the stage stops naming the drop (not an
    empty table for the advantage stage to refuse as "no rows; run the score stage first")."""
    tok = load_tokenizer(tiny_model_dir)
    src, out = tmp_path / "samples.parquet", tmp_path / "scores.parquet"
    write_table(make_samples(tok), src, SAMPLES)
    (tmp_path / "all_nan_rewards.py").write_text(
        "def nan(completions, **kw):\n    return [float('nan')] * len(completions)\n")
    params = cli_params(tmp_path, tiny_model_dir)
    data = yaml.safe_load(params.read_text())
    data["score"].update(rewards=[{"name": "n", "function": "all_nan_rewards:nan"}], on_invalid="drop")
    params.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "stages.score", "--params", str(params), "--samples", str(src),
                           "--out", str(out), "--policy", str(tiny_model_dir)], cwd=REPO, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: score.on_invalid: drop dropped all {len(ROWS)} completions (each had a NaN or inf reward); nothing is "
        "left to train on: fix the reward functions in score.rewards, or set score.on_invalid: error to stop at the "
        "first bad one with its name")
    assert not out.exists()


def test_on_invalid_drop_with_several_invalid_components(models, tmp_path, monkeypatch):
    """Two components invalid on different rows: both rows go, the others keep their exact weighted scores."""
    tok, policy, ref, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, USER_REWARD)
    sp = score_params(
        [{"name": "a", "function": f"{mod}:nan_on", "weight": 2.0, "kwargs": {"word": "loved"}},  # p1/0: NaN
         {"name": "b", "function": f"{mod}:nan_on", "weight": 3.0, "kwargs": {"word": "movie"}},  # p0/0: NaN
         {"name": "c", "function": f"{mod}:chars", "weight": 1.0}],
        on_invalid="drop",
    )
    samples = make_samples(tok)
    out, stats = score_samples(samples, build_rewards(sp.rewards), policy, ref, tok, sp)
    kept = [r for r in ROWS if r[:2] not in (("p1", 0), ("p0", 0))]
    assert stats["score/dropped"] == 2 and out.height == len(kept) == 4
    assert list(zip(out["prompt_id"], out["sample_idx"])) == [r[:2] for r in kept]
    assert out["score"].to_list() == pytest.approx([2.0 + 3.0 + len(r[3]) for r in kept])
    assert out["score/c"].to_list() == [float(len(r[3])) for r in kept]
    assert stats["rewards/c"] == pytest.approx(sum(len(r[3]) for r in kept) / 4)


def test_a_reward_that_does_not_apply_is_null_there_and_out_of_the_sum(models, tmp_path, monkeypatch, caplog):
    """None from a reward (TRL's "does not apply") leaves score/<name> null on that row and adds nothing to its score;
    the row is kept (not an invalid row: no drop, no warning), and the component's mean is over the rows it applied to."""
    tok, policy, _, _, _ = models
    mod = write_reward_module(tmp_path, monkeypatch, USER_REWARD)
    sp = score_params([{"name": "short", "function": f"{mod}:only_short", "weight": 2.0},
                       {"name": "chars", "function": f"{mod}:chars", "weight": 1.0}], on_invalid="drop")
    with caplog.at_level(logging.WARNING, logger="stages.score"):
        out, stats = score_samples(make_samples(tok), build_rewards(sp.rewards), policy, policy, tok, sp)
    short = [float(len(r[3].split())) if len(r[3].split()) <= 3 else None for r in ROWS]
    assert None in short and out["score/short"].to_list() == short
    assert out["score"].to_list() == pytest.approx([2.0 * (w or 0.0) + len(r[3]) for w, r in zip(short, ROWS)])
    assert out.height == len(ROWS) and stats["score/dropped"] == 0 and caplog.records == []
    assert stats["rewards/short"] == pytest.approx(np.mean([w for w in short if w is not None]))


def test_the_score_dtype_reaches_both_logprob_passes(models):
    """score.dtype: bfloat16 scores both passes in bf16 autocast (docs/design.md §7): the same numbers as
    sequence_logprobs in that dtype, not the fp32 ones."""
    tok, policy, ref, _, _ = models
    samples = make_samples(tok)
    p, c = [tok(t, add_special_tokens=False)["input_ids"] for t in samples["prompt_text"]], samples["completion_token_ids"].to_list()
    got = {}
    for dtype in ("float32", "bfloat16"):
        sp = score_params([{"name": "len", "function": "length"}], dtype=dtype)
        out, _ = score_samples(samples, build_rewards(sp.rewards), policy, ref, tok, sp)
        got[dtype] = out
        for col, model in (("logp_policy", policy), ("logp_ref", ref)):
            want = sequence_logprobs(model, p, c, tok.pad_token_id, dtype=dtype)[0]
            assert out[col].to_list() == pytest.approx(want, abs=1e-6), (dtype, col)
    assert got["bfloat16"]["logp_ref"].to_list() != pytest.approx(got["float32"]["logp_ref"].to_list(), abs=1e-4)


def test_reward_inputs_join_the_prompts_columns_by_prompt_id(models):
    """Rewards get the user's raw prompt, every extra column by name, the completion ids, and the chat turns when a
    prompt is conversational; a table that lacks a sample's prompt, or has a prompt_id twice, or a column named like
    a reward argument, is refused (its columns would reach the wrong completions)."""
    tok = models[0]
    samples = make_samples_table(tok, [("p0", 0, "<t>zero", "a", "stop"), ("p0", 1, "<t>zero", "b", "stop"),
                                       ("p1", 0, "<t>one", "c", "stop")])
    turns = [{"role": "user", "content": "raw one"}]
    prompts = pl.DataFrame({"prompt_id": ["p1", "p0"], "prompt": ["raw one", "raw zero"], "answer": ["b", "a"],
                            "messages": [json.dumps(turns), "[]"], "conversational": [True, False]})
    texts, inputs = reward_inputs(samples, prompts)
    assert texts == ["raw zero", "raw zero", "raw one"]
    assert inputs == {"completion_ids": samples["completion_token_ids"].to_list(), "answer": ["a", "a", "b"],
                      "messages": [[], [], turns]}
    # plain-text prompts: no chat turns; no prompts table: the rendered prompt and the ids only
    texts, inputs = reward_inputs(samples, prompts.with_columns(conversational=pl.lit(False)))
    assert set(inputs) == {"completion_ids", "answer"}
    # a table of the user's own: a prompt without raw text falls back to the rendered one; a plain prompt beside a
    # chat one may have no turns (None, not parsed); no row marked conversational (null counts as not): no turns
    mixed = prompts.with_columns(prompt=pl.Series([None, "raw zero"]), messages=pl.Series([json.dumps(turns), None]))
    texts, inputs = reward_inputs(samples, mixed)
    assert texts == ["raw zero", "raw zero", samples["prompt_text"][2]] and inputs["messages"] == [None, None, turns]
    unmarked = prompts.with_columns(conversational=pl.Series([None, None], dtype=pl.Boolean), messages=pl.lit(None))
    assert set(reward_inputs(samples, unmarked)[1]) == {"completion_ids", "answer"}
    assert reward_inputs(samples, None) == (samples["prompt_text"].to_list(),
                                            {"completion_ids": samples["completion_token_ids"].to_list()})
    other = make_samples_table(tok, [("p9", 0, "<t>nine", "d", "stop")])
    with pytest.raises(PipelineError, match=r"no row for prompt_id p9 .*pass the table the samples were drawn from"):
        reward_inputs(pl.concat([samples, other]), prompts)
    with pytest.raises(PipelineError) as exc:
        reward_inputs(samples, pl.concat([prompts, prompts.tail(1).with_columns(answer=pl.lit("x"))]))
    assert str(exc.value) == ("prompts table: prompt_id p0 appears more than once; use the table python -m "
                              "stages.prepare wrote (one row per prompt)")
    for name in ("completion_ids", "completions", "trainer_state"):
        with pytest.raises(PipelineError, match=f"column `{name}` has the name of a reward function's own argument"):
            reward_inputs(samples, prompts.with_columns(pl.lit("x").alias(name)))


def test_a_policy_with_nan_weights_is_named_not_the_rewards(models):
    """A diverged update (NaN weights) gave `rlhf_reward` NaN, and the advantage stage then advised fixing the
    rewards or dropping rows (every row); the score stage names the model and the fix."""
    import copy

    tok, policy, _, _, _ = models
    sp = score_params([{"name": "v", "function": "vader"}])
    samples = make_samples(tok)
    broken = copy.deepcopy(policy)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(PipelineError) as exc:
        score_samples(samples, build_rewards(sp.rewards), broken, policy, tok, sp)
    assert str(exc.value) == (
        f"score: the policy's logprob is nan for {samples.height} of {samples.height} completions (first prompt_id="
        f"{samples['prompt_id'][0]} sample_idx={samples['sample_idx'][0]}): its weights are no longer finite numbers "
        "(a diverged update): lower update.learning_rate and start over (python -m flows.train --restart)")
    with pytest.raises(PipelineError, match=r"^score: the reference's logprob is nan .*check score.ref_model"):
        score_samples(samples, build_rewards(sp.rewards), policy, broken, tok, sp)
    # the first round (the policy is the reference: the base model itself): no update to blame
    with pytest.raises(PipelineError, match=r"^score: the policy's logprob is nan .*: the model's weights are not finite "
                                            r"numbers; check base.model_dir \(or --policy\)$"):
        score_samples(samples, build_rewards(sp.rewards), broken, broken, tok, sp)
