"""The contract every sampler backend in `stages.sample.backends.BACKENDS` must pass (docs/design.md §4), on the tiny
model in fp32: K rows per prompt; logprobs aligned with the tokens (their sum is the model's own sequence logprob);
a prompt's completions fixed by its seed alone, whichever prompts share the call; and new weights visible in the next
generation, without a restart. A new backend is one table entry plus a run of this file (vLLM's engine start makes
its case slow)."""

from __future__ import annotations

import pytest
import torch

from conftest import repo_params
from stages.logprobs import sequence_logprobs
from stages.models import load_causal_lm, load_tokenizer
from stages.sample import GenerationConfig, make_sampler
from stages.sample.backends import BACKENDS

K = 3
CFG = GenerationConfig(k=K, max_tokens=8, temperature=1.0, top_p=1.0)
PROMPTS = ["write a short review of a film you liked", "tell me about the best movie you have seen",
           "what did you think of the music and the cast", "the story is slow but the ending is"]
SEEDS = [11, 22, 33, 44]


def _param(name):
    marks = [pytest.mark.slow] if name == "vllm" else []
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(scope="module", params=[_param(n) for n in BACKENDS])
def backend(request, tiny_model_dir):
    name = request.param
    if not BACKENDS[name].available():
        pytest.fail(f"backend {name} does not import here; the contract test must run for every backend")
    params = repo_params(base={"model_dir": str(tiny_model_dir)},
                         sample={"dtype": "float32", "max_model_len": 128, "batch_size": 2})
    sampler = make_sampler(str(tiny_model_dir), params, backend=name)
    tok = load_tokenizer(tiny_model_dir)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in PROMPTS]
    yield sampler, tok, ids
    sampler.close()


def test_k_rows_per_prompt_with_aligned_tokens_and_logprobs(backend):
    sampler, tok, ids = backend
    out = sampler.generate(ids, CFG, SEEDS)
    assert len(out) == len(PROMPTS) and all(len(group) == K for group in out)
    for group in out:
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) >= 1 and len(c.token_ids) <= CFG.max_tokens
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == CFG.max_tokens and c.token_ids[-1] != tok.eos_token_id)
            assert all(lp <= 0 for lp in c.logprobs)
    assert sampler.exact_logprobs  # fp32


def test_logprobs_are_the_models_own(backend, tiny_model_dir):
    sampler, tok, ids = backend
    out = sampler.generate(ids, CFG, SEEDS)
    model = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
    prompts = [ids[i] for i, g in enumerate(out) for _ in g]
    comps = [c.token_ids for g in out for c in g]
    sums, per_token = sequence_logprobs(model, prompts, comps, tok.pad_token_id, batch_size=4)
    got = [sum(c.logprobs) for g in out for c in g]
    assert got == pytest.approx(sums, abs=1e-3)
    for want, c in zip(per_token, [c for g in out for c in g]):
        assert c.logprobs == pytest.approx(want, abs=1e-4)


def test_a_prompts_completions_depend_on_its_seed_alone(backend):
    sampler, _, ids = backend
    together = sampler.generate(ids, CFG, SEEDS)
    alone = sampler.generate([ids[2]], CFG, [SEEDS[2]])  # another batch, another position
    reordered = sampler.generate([ids[3], ids[2], ids[0]], CFG, [SEEDS[3], SEEDS[2], SEEDS[0]])
    key = lambda group: [c.token_ids for c in group]  # noqa: E731
    assert key(alone[0]) == key(together[2]) == key(reordered[1])
    assert key(reordered[0]) == key(together[3]) and key(reordered[2]) == key(together[0])
    other = sampler.generate([ids[2]], CFG, [SEEDS[2] + 1])
    assert key(other[0]) != key(together[2])
    assert len({tuple(c.token_ids) for c in together[0]}) > 1  # the K completions of a prompt differ


def test_without_logprobs_the_same_completions(backend):
    """`GenerationConfig.logprobs=False` (a training round that does not use the engine's logprobs): the same tokens
    and texts; a backend may skip the logprobs (vLLM does: its per-token log-softmax and rank) or return them."""
    from dataclasses import replace

    sampler, _, ids = backend
    with_lp = sampler.generate(ids, CFG, SEEDS)
    without = sampler.generate(ids, replace(CFG, logprobs=False), SEEDS)
    pairs = [(a, b) for ga, gb in zip(with_lp, without, strict=True) for a, b in zip(ga, gb, strict=True)]
    assert all(a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason for a, b in pairs)
    assert all(b.logprobs is None or b.logprobs == a.logprobs for a, b in pairs)
    if sampler.name.startswith("vllm"):
        assert all(b.logprobs is None for _, b in pairs)
    assert all(a.logprobs is not None and len(a.logprobs) == len(a.token_ids) for a, _ in pairs)


def test_new_weights_are_visible_in_the_next_generation(backend, tiny_model_dir):
    sampler, tok, ids = backend
    greedy = GenerationConfig(k=1, max_tokens=6, greedy=True)
    base = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
    before = sampler.generate(ids, greedy, SEEDS)
    g = torch.Generator().manual_seed(0)
    changed = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    try:
        sampler.update_weights(state_dict=changed)
        # vLLM on a CPU: pushed straight into its packed linears (the tiny model's layout is taken whole)
        assert getattr(sampler, "direct", True)
        after = sampler.generate(ids, greedy, SEEDS)
        assert [c.token_ids for grp in after for c in grp] != [c.token_ids for grp in before for c in grp]
        model = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
        model.load_state_dict(changed)
        sums, _ = sequence_logprobs(model, ids, [grp[0].token_ids for grp in after], tok.pad_token_id)
        assert [sum(grp[0].logprobs) for grp in after] == pytest.approx(sums, abs=1e-3)  # the new model's logprobs
    finally:
        sampler.update_weights(state_dict=base.state_dict())
    again = sampler.generate(ids, greedy, SEEDS)
    assert [c.token_ids for grp in again for c in grp] == [c.token_ids for grp in before for c in grp]


def test_a_backend_added_to_the_table_is_a_choice_of_the_sample_stage(monkeypatch, capsys):
    """README "Extending": one `Backend` entry, and `python -m stages.sample --backend <name>` takes it as
    `sample.backend` does (the choices were typed out as auto, vllm, hf)."""
    from stages.sample.__main__ import main
    from stages.sample.backends import BACKENDS

    monkeypatch.setitem(BACKENDS, "hf_timed", BACKENDS["hf"])
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--backend {auto,vllm,hf,hf_timed}" in capsys.readouterr().out
