"""The precision choices of the scoring path, pinned (docs/design.md §7; the tolerances the README states):

- `score.dtype: auto` is bf16 exactly where bf16 is native (fp32 elsewhere);
- the fp32 path (shared prompts) gives each sequence's KL within 1e-3 nats of a plain fp32 forward pass (tiny model
  here, fast; the real SmolLM2 on sampled completions in the slow test);
- skipping the policy pass (an fp32 sampler's logprobs as logp_policy) changes the advantages by less than
  beta x 1e-3;
- `sample.dtype: auto` is bf16 on GPUs and on CPUs with AMX, fp32 on other CPUs;
- the default paths on the real model stay within the README's tolerance of the fp32 KL (mean |error| per sequence
  < TOL_SEQ nats, the batch's mean KL within TOL_MEAN nats): on CPUs without AMX the policy's fp32 logprobs as an
  fp32 sampler gives them and the reference in `score.dtype: auto`; on CPUs with AMX and on GPUs both passes in bf16
  (TRL's choice).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from conftest import repo_params
from stages.advantage import compute_advantages
from stages.logprobs import sequence_logprobs, token_logprobs
from stages.models import load_causal_lm, load_tokenizer
from stages.rewards import build_rewards
from stages.sample import generation_config, make_sampler, sample_prompts
from stages.score import completion_inputs, score_samples

TOL_KL = 1e-3
TOL_SEQ = 0.3  # the README's tolerance for the default path's KL: mean |error| per sequence (measured 0.17-0.19)
TOL_SEQ_EMULATED = 0.4  # both passes in bf16 autocast on a CPU without native bf16 (not a default there)
TOL_MEAN = 0.1  # ... and on the batch's mean KL (measured +0.02 on 128 completions; this test's batch is 12)


def plain_fp32(model, prompts, completions, pad):
    import torch

    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            lp, _, _ = token_logprobs(model, [p], [c], pad)
            out.append(float(lp.double().sum()))
    return np.array(out)


@pytest.fixture(scope="module")
def tiny_round(tiny_model_dir, tmp_path_factory):
    from conftest import make_tiny_model
    from stages.prepare import prompts_frame

    params = repo_params(base={"model_dir": str(tiny_model_dir)},
                         sample={"backend": "hf", "dtype": "float32", "k": 4, "max_completion_length": 8,
                                 "max_model_len": 128})
    tok = load_tokenizer(tiny_model_dir)
    prompts = prompts_frame(["write a short review of a film you liked", "tell me about the best movie you have seen",
                             "what did you think of the music and the cast"], None)
    sampler = make_sampler(str(tiny_model_dir), params, backend="hf")
    samples, _ = sample_prompts(sampler, tok, prompts, generation_config(params.sample), 7, 0, 0, 128)
    sampler.close()
    policy = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
    ref = load_causal_lm(make_tiny_model(tmp_path_factory.mktemp("ref") / "m", seed=3), "float32", "cpu").eval()
    return params, tok, samples, policy, ref, prompts


def test_auto_score_dtype_is_bf16_exactly_where_it_is_native():
    from stages.runtime import fast_bf16, score_dtype

    assert repo_params().score.dtype == "auto"  # the default this pins
    assert score_dtype("auto") == ("bfloat16" if fast_bf16() else "float32")
    assert score_dtype("float32") == "float32" and score_dtype("bfloat16") == "bfloat16"


def test_auto_sampler_dtype_is_bf16_on_gpus_and_cpus_with_amx(monkeypatch):
    import torch

    from stages import runtime

    assert repo_params().sample.dtype == "auto"  # the default this pins
    score = repo_params().score
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, want in ((True, "bfloat16"), (False, "float32")):  # AVX512-BF16 without AMX: fp32 (its logprobs reused)
        monkeypatch.setattr(runtime, "amx_bf16", lambda amx=amx: amx)
        assert runtime.sampler_dtype("auto") == runtime.sampler_dtype("auto", score) == want
        assert runtime.sampler_dtype("float32") == "float32" and runtime.sampler_dtype("bfloat16") == "bfloat16"
        # on AMX too: an fp32 KL, or the sampler's own logprobs asked for, keep the fp32 engine (no fp32 policy pass)
        for change in ({"dtype": "float32"}, {"policy_logprobs": "sampler"}):
            assert runtime.sampler_dtype("auto", score.model_copy(update=change)) == "float32"
            assert runtime.sampler_dtype("bfloat16", score.model_copy(update=change)) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        assert runtime.sampler_dtype("auto") == want


def test_update_autocast_is_asked_for_and_native(monkeypatch):
    from stages import runtime

    assert repo_params().update.bf16_autocast  # the default this pins
    for native in (True, False):
        monkeypatch.setattr(runtime, "fast_bf16", lambda native=native: native)
        assert runtime.update_autocast(True) is native
        assert runtime.update_autocast(False) is False


def test_fp32_scoring_path_kl_equals_a_plain_fp32_pass(tiny_round):
    params, tok, samples, policy, ref, _ = tiny_round
    assert params.base.share_prompts  # the default this test pins
    p, c = completion_inputs(samples, tok)
    pad = tok.pad_token_id
    got = np.array(sequence_logprobs(policy, p, c, pad, 5)[0]) - np.array(sequence_logprobs(ref, p, c, pad, 5)[0])
    want = plain_fp32(policy, p, c, pad) - plain_fp32(ref, p, c, pad)
    assert np.abs(got - want).max() < TOL_KL and np.abs(want).max() > 0.01


def test_skipping_the_policy_pass_leaves_the_advantages(tiny_round):
    params, tok, samples, policy, ref, prompts = tiny_round
    rewards = build_rewards(params.score.rewards)
    from_sampler = [float(sum(x)) for x in samples["sampler_logprobs"]]
    sp = params.score.model_copy(update={"dtype": "float32"})
    a, _ = score_samples(samples, rewards, policy, ref, tok, sp, prompts, logp_policy=from_sampler)
    b, _ = score_samples(samples, rewards, policy, ref, tok, sp, prompts)
    assert np.abs(a["logp_policy"].to_numpy() - b["logp_policy"].to_numpy()).max() < TOL_KL
    for est in ("rloo", "grpo", "batch_mean"):
        ap = params.advantage.model_copy(update={"estimator": est})
        xa, _, _ = compute_advantages(a, ap)
        xb, _, _ = compute_advantages(b, ap)
        assert (xa["advantage"] - xb["advantage"]).abs().max() < params.score.beta * TOL_KL * (10 if est == "grpo" else 1)


@pytest.mark.slow
def test_real_model_kl_precision(base_model_dir, vllm_sampler):
    """SmolLM2 on its own fp32 completions of real prompts, against a perturbed copy as the policy (KL ~ 0.1-1)."""
    import torch

    from stages.io import read_table  # noqa: F401
    from stages.prepare import prompts_frame

    params = repo_params(sample={"dtype": "float32"})
    tok = load_tokenizer(base_model_dir)
    prompts = prompts_frame(["Write a short review of The Last Lighthouse, a new drama.",
                             "Complete this review: \"The soundtrack of Midnight Harbor was",
                             "Write the next sentences of this review: \"I expected little from Paper Moons, but"], None)
    samples, _ = sample_prompts(vllm_sampler, tok, prompts, generation_config(params.sample), 5, 0, 0, 512)
    ref = load_causal_lm(base_model_dir, "float32", "cpu").eval()
    policy = load_causal_lm(base_model_dir, "float32", "cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in policy.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * 2e-3 * prm.abs().mean())
    p, c = completion_inputs(samples, tok)
    pad = tok.pad_token_id
    want = plain_fp32(policy, p, c, pad) - plain_fp32(ref, p, c, pad)
    got = np.array(sequence_logprobs(policy, p, c, pad)[0]) - np.array(sequence_logprobs(ref, p, c, pad)[0])
    assert np.abs(got - want).max() < TOL_KL, np.abs(got - want).max()
    # the default path: logp_policy as an fp32 sampler gives it (the fp32 policy's, 1.6e-4 off), the reference pass
    # in score.dtype: auto
    rewards = build_rewards(params.score.rewards)
    fp32_policy = list(sequence_logprobs(policy, p, c, pad, dtype="float32")[0])
    out, _ = score_samples(samples, rewards, policy, ref, tok, params.score, prompts, logp_policy=fp32_policy)
    default = out["kl"].to_numpy()
    assert np.abs(default - want).mean() < TOL_SEQ, np.abs(default - want).mean()
    assert abs(default.mean() - want.mean()) < TOL_MEAN, (default.mean(), want.mean())
    # the default on CPUs with AMX and on GPUs (`sample.dtype: auto` is bf16 there, so the policy's logprobs come from
    # a bf16 forward, the update's own, and the reference pass batches the round as it does; TRL's choice): both
    # passes in bf16 autocast over one batch (these 12 completions), within the same tolerance
    bf16 = (np.array(sequence_logprobs(policy, p, c, pad, dtype="bfloat16")[0])
            - np.array(sequence_logprobs(ref, p, c, pad, dtype="bfloat16")[0]))
    print(f"KL |error| per sequence: fp32 policy + {params.score.dtype} reference {np.abs(default - want).mean():.3f}, "
          f"both bf16 {np.abs(bf16 - want).mean():.3f}; mean KL {want.mean():.3f} (fp32), {default.mean():.3f}, "
          f"{bf16.mean():.3f}")
    # where bf16 is native (the CPUs and GPUs on which this path is the default) within the README's tolerance; where
    # it is emulated (the fp32 default runs there) torch's emulated bf16 rounds otherwise: 0.302 on the 2-core Ice
    # Lake Xeon (2026-12-07), so a looser bound there
    from stages.runtime import fast_bf16

    tol = TOL_SEQ if fast_bf16() or torch.cuda.is_available() else TOL_SEQ_EMULATED
    assert np.abs(bf16 - want).mean() < tol, np.abs(bf16 - want).mean()
    assert abs(bf16.mean() - want.mean()) < TOL_MEAN, (bf16.mean(), want.mean())
    assert pl.Series(want).abs().mean() > 0.01  # a KL that the check can see


def test_the_references_bf16_view_gives_its_numbers_to_the_bit_and_shares_the_rest():
    """`models.with_bf16_linears` (the rounds' bf16 reference pass on a CPU): bf16 copies of the linear weights (a
    tied lm_head its own), the norms and the embedding the model's own tensors, the model itself untouched, and
    under bf16 autocast the same logprobs as the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.models import with_bf16_linears

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                         tie_word_embeddings=True)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    view = with_bf16_linears(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, still fp32, the same values
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: torch.float32 for n in before}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    linears = [m for m in view.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert torch.equal(view.lm_head.weight, model.lm_head.weight.detach().bfloat16())
    assert view.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert view.model.norm.weight is model.model.norm.weight
    prompts, completions = [[5, 6, 7], [8, 9], [5, 6, 7]], [[10, 11, 12], [13], [14, 15]]
    a, _ = sequence_logprobs(model, prompts, completions, 0, 3, dtype="bfloat16")
    b, _ = sequence_logprobs(view, prompts, completions, 0, 3, dtype="bfloat16")
    assert a == b
    fp32, _ = sequence_logprobs(model, prompts, completions, 0, 3, dtype="float32")
    assert fp32 != a  # (the bf16 pass is another computation: the comparison above can fail)
