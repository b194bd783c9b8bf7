"""vLLM sampler: one engine per run, new weights pushed in place (before it samples from them: `steps.sync_sampler`).

In-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by `configure_vllm_env`): on this CPU it
starts in ~5 s instead of a worker process, and weights can be handed over as tensors without touching disk:
straight into the linears' packed kernels where the engine is eager and on a CPU (`_direct_reload`, ~0.12 s for
135M), else through `collective_rpc("reload_weights", weights_iterator=...)` (~0.25 s).
In multiprocess mode (e.g. `sample.tensor_parallel_size > 1`, where the engine's workers are other processes)
the same state dict goes through a temporary safetensors directory (`weights_path=`) that the workers read. After every reload the prefix cache is reset (KV computed under the old weights would
be reused otherwise) and, for tied embeddings, the lm_head's pre-packed CPU GEMM weight is rebuilt
(docs/design.md §7: the CPU backend otherwise keeps computing logits with the old pre-packed copy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import weakref

from stages.sample import Completion, GenerationConfig, configure_vllm_env

log = logging.getLogger(__name__)


def _refresh_lm_head(worker) -> bool:
    """Runs on the worker: re-tie and re-pack the lm_head after a reload. True when it did anything."""
    model = worker.model_runner.model
    lm_head = getattr(model, "lm_head", None)
    method = getattr(lm_head, "quant_method", None)
    if lm_head is None or method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model.config, "tie_word_embeddings", False) and embed is not None and lm_head.weight is not embed.weight:
        lm_head.weight = embed.weight
    method.process_weights_after_loading(lm_head)
    return True


def _direct_reload(worker, weights: dict) -> str | None:
    """Runs on the worker of an eager in-process engine on a CPU: the trainer's `weights` (transformers' names, any
    float dtype) written into the engine without vLLM's layerwise reload, which rebuilds every layer's parameters
    before loading them (its linears hold only their pre-packed GEMM weights). Each linear gets a new weight in the
    engine's dtype, its stacked parts (`packed_modules_mapping`: q/k/v, gate/up) copied into place with the cast in
    the copy, and is packed by vLLM's own dispatch, as at load; every other parameter is copied in place, as vLLM's
    loaders write it (only where its loader is a plain copy: an embedding's padding rows past the vocabulary zeroed;
    a tied lm_head's weight into the embedding after the embedding's own, skipped where it is the embedding's
    tensor), and `_refresh_lm_head` re-packs the lm_head after it. Returns None when done, else why not, having
    changed nothing: a model not laid out as this expects (a weight it cannot place or an engine parameter the state
    dict lacks, a bias, a quantized or unpacked linear, a loader that is more than a copy, logits from another module
    than an `lm_head`); the caller then reloads the usual way. The same engine weights to the bit as
    `reload_weights` (tests/test_sample.py; docs/design.md §7)."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    model = worker.model_runner.model
    if not isinstance(getattr(model, "lm_head", None), ParallelLMHead):  # e.g. Gemma2: logits from embed_tokens,
        return "the model has no lm_head module"  # whose own packed copy only vLLM's reload rebuilds
    packed = getattr(model, "packed_modules_mapping", None) or {}
    linears, used, linear_params = [], set(), set()
    # an embedding's rows: the vocabulary (its loader takes exactly that many), padded to a multiple of 64 (zeroed)
    vocab: dict = {}
    for name, mod in model.named_modules():
        if isinstance(mod, VocabParallelEmbedding) and getattr(mod, "tp_size", 1) == 1:
            vocab[f"{name}.weight"] = mod
        if not isinstance(mod, LinearBase):
            continue
        plain = isinstance(getattr(mod, "quant_method", None), UnquantizedLinearMethod) and hasattr(mod, "cpu_linear")
        if not plain or getattr(mod, "bias", None) is not None or getattr(mod, "_cpu_skip_gemm_dispatch", False):
            return f"{name} is not a plain CPU linear without a bias"
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}.weight" if prefix else f"{p}.weight" for p in packed.get(leaf, [leaf])]
        shape = (getattr(mod, "output_size_per_partition", -1), getattr(mod, "input_size_per_partition", -1))
        rows = list(getattr(mod, "output_partition_sizes", [shape[0]]))
        if len(rows) != len(parts) or sum(rows) != shape[0]:
            return f"{name} stacks {len(rows)} parts, not {len(parts)}"
        for part, n in zip(parts, rows):
            if part not in weights or tuple(weights[part].shape) != (n, shape[1]):
                return f"no weight {part} of shape ({n}, {shape[1]}) for {name}"
        linears.append((mod, parts, shape))
        used.update(parts)
        linear_params.add(f"{name}.weight")
    params = dict(model.named_parameters())
    # a tied lm_head is the embedding's parameter (named once): its weight goes there after the embedding's, as vLLM's
    # reload leaves it, and not at all where it is the embedding's own tensor (the trainer's)
    head = getattr(model.lm_head, "weight", None)
    tied = None if "lm_head.weight" in params else next((n for n, q in params.items() if q is head), None)
    others, last = [], []
    for n, t in weights.items():
        if n in used:
            continue
        dest = tied if n == "lm_head.weight" and tied else n
        if dest != n and dest in weights:
            if _same_tensor(weights[dest], t):
                continue
            if not any(p is params[dest] for p, _ in others):
                return f"the tied {n} comes before {dest} with other values"
        p = params.get(dest)
        if p is None:
            return f"the engine has no parameter {n}"
        loader = getattr(p, "weight_loader", None)
        loader = getattr(loader, "__func__", loader)  # a bound method's function
        if dest in vocab:
            rows = vocab[dest].org_vocab_size
            if loader is not VocabParallelEmbedding.weight_loader or tuple(t.shape) != (rows, p.shape[1]):
                return f"{n} is not a ({rows}, {p.shape[1]}) embedding vLLM's loader copies as it is"
        elif p.shape != t.shape or loader not in (None, default_weight_loader):
            return f"the engine has no parameter {n} of shape {tuple(t.shape)} that its loader copies as it is"
        (last if dest != n else others).append((p, t))
    others += last
    missing = set(params) - linear_params - {n for n in weights if n in params}
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"the state dict lacks {sorted(missing)[0]}{more}"
    with torch.inference_mode():
        for p, t in others:
            if p.shape == t.shape:
                p.data.copy_(t)
            else:  # the vocabulary's padding rows zeroed, as vLLM's loader does
                p.data[: t.shape[0]].copy_(t)
                p.data[t.shape[0] :].zero_()
        for mod, parts, shape in linears:
            w = torch.empty(shape, dtype=mod.weight.dtype)
            row = 0
            for p in parts:
                w[row : row + weights[p].shape[0]].copy_(weights[p])
                row += weights[p].shape[0]
            old = mod.weight, mod.cpu_linear
            try:
                mod.weight = torch.nn.Parameter(w, requires_grad=False)
                dispatch_cpu_unquantized_gemm(mod, remove_weight=True)
                if mod.weight.shape != old[0].shape:  # packing failed and vLLM kept the plain weight (torch's linear)
                    raise RuntimeError(f"vLLM did not pack the new weight of {type(mod).__name__}")
            except BaseException:  # the layer as it was, so that vLLM's reload that follows can rebuild it
                mod.weight, mod.cpu_linear = old
                raise
    return None


def _same_tensor(a, b) -> bool:
    """`a` and `b` are views of the same memory with the same layout (a tied weight handed over under two names)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device)


@contextlib.contextmanager
def weights_dir(state_dict):
    """A temporary directory holding `state_dict` as one safetensors file (tensors that share storage, like a
    tied lm_head, are written once: vLLM re-ties them), removed afterwards."""
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    tensors = {}
    for name, t in state_dict.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = name
        tensors[name] = t.detach().contiguous().cpu()
    with tempfile.TemporaryDirectory(prefix="rloo-weights-") as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        yield tmp


CPU_BLOCK = 32  # vLLM's CPU attention takes multiples of 32; its default there is 128


def kv_block_size(setting: int, cpu: bool) -> int | None:
    """The engine's KV-cache block size (`sample.block_size`; None = vLLM's default). Prefix caching shares whole
    blocks only, and a round's K completions of a prompt start in the same step: with CPU vLLM's default of 128
    tokens a ~50-token prompt fills no block, so every completion ran the prompt's prefill again (1.8 s of a 4.4 s
    round here; 0.9 s with 32-token blocks, docs/design.md §7). `cpu`: vLLM's platform is the CPU one (GPUs and other
    accelerators keep vLLM's default)."""
    if setting == 0:
        return CPU_BLOCK if cpu else None
    if cpu and setting % CPU_BLOCK:
        from stages.errors import PipelineError

        raise PipelineError(f"sample.block_size: vLLM's CPU attention needs a multiple of {CPU_BLOCK}, got {setting}; "
                            "set 0 (auto) or 32, 64, ...")
    return setting


def cpu_attention_refuses(model_dir: str) -> str | None:
    """Why vLLM's CPU attention cannot run this model, or None: it takes a fixed set of head sizes (not 16, say, which
    a small custom model may have), and otherwise stops deep in the engine's start with a RuntimeError."""
    import json
    from pathlib import Path

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except Exception:  # another vLLM layout or an unreadable config: the engine's own check stays
        return None
    cfg = cfg.get("text_config") or cfg
    head = cfg.get("head_dim")
    if not head and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        head = cfg["hidden_size"] // cfg["num_attention_heads"]
    if not isinstance(head, int) or head in sizes:
        return None
    return (f"vLLM's CPU attention takes head sizes {', '.join(map(str, sizes))}; the model in {model_dir} has "
            f"head_dim {head}")


CPU_NORM_PROVIDER = "rloo_cpu"


def _norm_args_fit(x, weight, epsilon, variance_size=None) -> bool:
    # the kernels' own checks stop the engine on a row that is not whole vectors (`hidden_size % VEC_ELEM_NUM`: 8 or
    # 16 by the CPU's build): 16 keeps every build's; anything else runs the native norm. fp32 rows, or bf16 where the
    # CPU converts to bf16 itself (AVX512-BF16): elsewhere the kernel's emulated conversion truncates, so a third of
    # a bf16 residual's elements came out one unit in the last place off the native's round-to-nearest (the norm's
    # error 2.6x the native's; the 2-core Ice Lake Xeon, 2026-12-07)
    return (variance_size is None and weight is not None and weight.dtype == x.dtype and _exact_dtype(x.dtype)
            and x.is_contiguous() and weight.is_contiguous() and weight.shape == x.shape[-1:]
            and x.shape[-1] % 16 == 0)


def _exact_dtype(dtype) -> bool:
    """Whether vLLM's CPU norm kernels round to `dtype` as torch does: fp32 always, bf16 where the CPU has
    AVX512-BF16 (its conversion instruction rounds to nearest even), no other dtype."""
    import torch

    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def _add_norm_args_fit(x, x_residual, weight, epsilon, variance_size=None) -> bool:
    return (_norm_args_fit(x, weight, epsilon, variance_size) and x_residual.is_contiguous()
            and x_residual.shape == x.shape)


def _cpu_rms_norm(x, weight, epsilon, variance_size=None):
    import torch

    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def _cpu_add_rms_norm(x, x_residual, weight, epsilon, variance_size=None):
    import torch

    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)  # in place: residual = x + residual, x = norm
    return x, x_residual


def cpu_norm_kernels() -> dict:
    """The engine kwargs that run vLLM's RMSNorms through its own compiled CPU kernels, or {} where they do not apply.

    vLLM 0.32 dispatches its RMSNorms through its IR ops (`vllm.ir.ops.rms_norm`, `fused_add_rms_norm`), whose
    compiled implementation (`vllm_c`) is registered for GPUs only; on the CPU every norm of every decoding step
    runs the native one, ~10 small torch ops on a batch of 32 rows: ~68 us against ~8 us a call in a tight loop for
    the kernel the CPU build ships as `torch.ops._C.fused_add_rms_norm`. This registers that kernel as a provider
    (`rloo_cpu`, for the arguments it takes: a weight of the input's dtype, contiguous rows of whole vectors) and
    puts it first in the engine's priority; vLLM appends its native one, which runs the rest. Measured on the
    default round (docs/design.md §7): sampling 8-13 % faster. The provider lives in this process, so only an
    in-process engine can use it (the caller checks); where the CPU build lacks the kernels, or the platform is not
    the CPU, nothing changes. vLLM installs an engine's priority for the whole process when the engine starts: the
    last engine started sets it for all."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    try:
        from vllm import ir
    except ImportError:  # another vLLM layout: its own norms
        return {}
    try:
        current_platform.import_kernels()  # loads vllm._C, which the engine would load at its start
    except Exception:
        return {}
    ops = getattr(torch.ops, "_C", None)
    if not (hasattr(ops, "rms_norm") and hasattr(ops, "fused_add_rms_norm")):
        return {}
    # torch infers the ops' schemas from real annotations (this module's are strings)
    tensor, maybe = torch.Tensor, torch.Tensor | None
    if CPU_NORM_PROVIDER not in ir.ops.rms_norm.impls:
        _cpu_rms_norm.__annotations__ = {"x": tensor, "weight": maybe, "epsilon": float, "variance_size": int | None,
                                         "return": tensor}
        ir.ops.rms_norm.register_impl(CPU_NORM_PROVIDER, supports_args=_norm_args_fit, supported=True)(_cpu_rms_norm)
    if CPU_NORM_PROVIDER not in ir.ops.fused_add_rms_norm.impls:
        _cpu_add_rms_norm.__annotations__ = {"x": tensor, "x_residual": tensor, "weight": maybe, "epsilon": float,
                                             "variance_size": int | None, "return": tuple[tensor, tensor]}
        ir.ops.fused_add_rms_norm.register_impl(CPU_NORM_PROVIDER, supports_args=_add_norm_args_fit, supported=True,
                                                inplace=True)(_cpu_add_rms_norm)
    return {"ir_op_priority": {"rms_norm": [CPU_NORM_PROVIDER], "fused_add_rms_norm": [CPU_NORM_PROVIDER]}}


CDF_BLOCK = 256  # tokens a block of `inverse_cdf_draw`'s two-level search (~sqrt of a 49k vocabulary)


def inverse_cdf_draw(logits, generators: dict, u=None):
    """One token per row of `logits` drawn from softmax(logits) by inverting its cumulative sum with one uniform draw
    per row: from the row's own generator where `generators` has one ({row: torch.Generator}, vLLM's seeded
    requests), else from torch's global one (`u`, a (rows, 1) float64 tensor in [0, 1), replaces the draws in tests).

    Exact up to float64 rounding of the running sum of the fp32 `exp(logits - max)` (a masked token, -inf, has no
    mass and is never drawn). The sum runs in two levels: the float64 sums of blocks of `CDF_BLOCK` tokens and their
    running sum find the draw's block, then the running sum inside that block alone finds its token; one float64
    running sum over the whole vocabulary took 5x as long (7.0 against 1.3 ms for 32 rows of a 49k vocabulary on 2
    AMX cores; the same tokens in 9600 draws, docs/design.md §7). vLLM's CPU sampler draws one Gumbel noise per
    vocabulary entry instead (`fused_gumbel_argmax`): 4.7 ms a decoding step there. Each row's draw depends on its
    own generator alone, as vLLM's does, so a prompt's completions still depend on its seed alone (§4)."""
    import torch

    x = logits.float()
    e = (x - x.amax(-1, keepdim=True)).exp_()
    rows, v = e.shape
    if u is None:  # (every row seeded, as this pipeline's requests are: torch's global generator is left alone)
        u = (torch.empty if len(generators) == rows else torch.rand)(rows, 1, dtype=torch.float64, device=x.device)
        for i, gen in generators.items():
            u[i] = torch.rand(1, dtype=torch.float64, device=x.device, generator=gen)
    bs, full = CDF_BLOCK, v // CDF_BLOCK
    sums = [e[:, : full * bs].view(rows, full, bs).sum(-1, dtype=torch.float64)] if full else []
    if v > full * bs:
        sums.append(e[:, full * bs :].sum(-1, keepdim=True, dtype=torch.float64))
    cs = torch.cat(sums, 1).cumsum(-1)
    target = u * cs[:, -1:]
    block = torch.searchsorted(cs, target, right=True)  # the first block whose running sum passes the draw
    over = block >= cs.shape[1]  # the draw times the total rounded up to the total: the last token with mass
    block.clamp_(max=cs.shape[1] - 1)
    before = torch.where(block > 0, cs.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    cols = block * bs + torch.arange(bs, device=x.device)
    inside = cols < v  # the last block may be short
    part = torch.where(inside, e.gather(1, cols.clamp(max=v - 1)), torch.zeros((), dtype=e.dtype, device=x.device))
    j = torch.searchsorted(part.cumsum(-1, dtype=torch.float64), target - before, right=True)
    short = j >= bs  # the block's running sum rounded below its sum: its last token with mass
    if bool(short.any()):
        j = torch.where(short, bs - 1 - (part.flip(-1) > 0).to(torch.uint8).argmax(-1, keepdim=True), j)
    idx = block * bs + j
    if bool(over.any()):
        last = v - 1 - (e.flip(-1) > 0).to(torch.uint8).argmax(-1, keepdim=True)
        idx = torch.where(over, last, idx)
    return idx.squeeze(1)


def topk_topp_sampler(worker):
    """Runs on the worker: the engine's top-k/top-p sampler module, whose `forward` draws the tokens (None where the
    runner has none)."""
    return getattr(getattr(getattr(worker, "model_runner", None), "sampler", None), "topk_topp_sampler", None)


def _inverse_cdf_sampler(worker) -> bool:
    """Runs on the worker: vLLM's CPU top-k/top-p sampler draws with `inverse_cdf_draw` instead of its per-entry Gumbel
    noise (its top-k/top-p masks as they are). Only where vLLM chose its CPU path and returns no processed logprobs
    (this engine asks for raw ones); True when it did."""
    tks = topk_topp_sampler(worker)
    if tks is None or getattr(tks, "forward_cpu", None) is None or tks.forward != tks.forward_cpu:
        return False
    if getattr(tks, "use_fp64_gumbel", False) or str(getattr(tks, "logprobs_mode", "")).startswith("processed"):
        return False
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    def forward(logits, generators, k, p):
        return inverse_cdf_draw(apply_top_k_top_p(logits, k, p), generators), None

    tks.forward = forward
    return True


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class QuietRotaryReload(logging.Filter):
    """Drops vLLM's `RotaryEmbedding: Failed to load weights`, printed on every weight push on some CPUs: the rotary
    layer's only tensor is its cos/sin cache, a buffer no checkpoint holds, and vLLM puts it back as it was (the
    engine decodes like transformers after a push, tests/test_sample.py). The same warning for any other layer
    (a weight that really did not load) still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def quiet_rotary_reload() -> None:
    """Installs `QuietRotaryReload` on vLLM's reload logger, once per process (the engine's own process: an engine
    with worker processes still prints it there)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, QuietRotaryReload) for f in logger.filters):
        logger.addFilter(QuietRotaryReload())


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# this process's in-process engines (`VLLMSampler.in_process`), for `_shared_state_goes_with_the_last_engine`
_IN_PROCESS: weakref.WeakSet = weakref.WeakSet()


def _engine_core(llm):
    """The `EngineCore` of an in-process `LLM` (its client's), or None where vLLM lays it out otherwise."""
    return getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "engine_core", None)


def _shared_state_goes_with_the_last_engine() -> None:
    """An in-process engine's shutdown (`EngineCore.shutdown`, on `close` or when its client is collected or the
    interpreter exits) tears down this process's vLLM parallel groups (`cleanup_dist_env_and_memory`), which are
    global: another in-process engine still open then failed at its next generate ("pipeline model parallel group is
    not initialized"). Wrapped once per process, before the first engine starts (its client binds `shutdown` then):
    while another engine is open, a shutting-down one frees only its own memory (the garbage, and the accelerator's
    cached blocks on a GPU), and the groups go with the last one (docs/design.md §7)."""
    import gc

    import vllm.v1.engine.core as core

    real_cleanup, real_shutdown = getattr(core, "cleanup_dist_env_and_memory", None), core.EngineCore.shutdown
    if real_cleanup is None or getattr(real_cleanup, "keeps_open_engines", False):
        return
    closing: list = []  # the cores whose shutdown is running

    def shutdown(self, *args, **kwargs):
        closing.append(self)
        try:
            return real_shutdown(self, *args, **kwargs)
        finally:
            closing.remove(self)

    def cleanup(*args, **kwargs):
        def still_open(sampler) -> bool:
            core_ = sampler.core() if getattr(sampler, "llm", None) is not None else None
            return core_ is not None and not any(core_ is c for c in closing)

        if not any(still_open(s) for s in list(_IN_PROCESS)):
            return real_cleanup(*args, **kwargs)
        gc.unfreeze()  # as vLLM's does, without the teardown
        gc.collect()
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            import torch

            torch.accelerator.empty_cache()
        return None

    cleanup.keeps_open_engines = True
    core.cleanup_dist_env_and_memory = cleanup
    core.EngineCore.shutdown = shutdown


class VLLMSampler:
    name = "vllm"

    def __init__(self, model_dir: str, sample_params, seed: int = 0, device=None):
        configure_vllm_env(sample_params)
        import torch
        from vllm import LLM

        from stages.runtime import backend_dtype

        self.params = sample_params
        dtype = backend_dtype(sample_params.dtype)
        ranks = _world_size()
        if ranks > 1 and sample_params.tensor_parallel_size > 1:
            from stages.errors import PipelineError

            raise PipelineError("sample.tensor_parallel_size: > 1 with several training ranks is not supported; each "
                                "rank runs its own engine (set it to 1), or run one rank with a tensor-parallel engine")
        # the engine runs in this process (its weights can be handed over as tensors) unless its workers are others
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and sample_params.tensor_parallel_size == 1
        self.dtype = getattr(torch, dtype)
        kwargs = dict(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=sample_params.enforce_eager,
            max_model_len=sample_params.max_model_len,
            seed=seed,
            tensor_parallel_size=sample_params.tensor_parallel_size,
            enable_prefix_caching=True,
            # a prefill split over steps makes vLLM rewind a seeded request's generator, which CPU generators
            # refuse ("CPU Generator does not use offset", seen from 256 sequences on): schedule whole prefills
            enable_chunked_prefill=False,
        )
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        block = kv_block_size(sample_params.block_size, cpu)
        if block:
            kwargs["block_size"] = block
        if not cpu:
            kwargs["gpu_memory_utilization"] = sample_params.gpu_memory_utilization
        else:  # sized for the task: a larger cache only adds resident memory (1 -> 0.25 GiB: peak RSS -0.77 GiB)
            kwargs["kv_cache_memory_bytes"] = int(sample_params.cpu_kvcache_space_gib * 2**30)
        if self.in_process and sample_params.enforce_eager:  # (a compiled engine's inductor fuses the native norms)
            kwargs.update(cpu_norm_kernels())
        if ranks > 1:
            # one engine per training rank, in the rank's own process (TRL's colocate mode): vLLM joins the
            # torch.distributed group torchrun set up instead of starting workers (docs/design.md §8)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.in_process:
            _shared_state_goes_with_the_last_engine()
        self.llm = LLM(**kwargs)
        core = _engine_core(self.llm)
        self.core = weakref.ref(core) if core is not None else (lambda: None)
        if self.in_process:
            _IN_PROCESS.add(self)
        quiet_rotary_reload()
        # the CPU sampler's draw without a noise per vocabulary entry (its workers must be this process: the function
        # is handed over as an object)
        self.inverse_cdf = bool(self.in_process and cpu and self.llm.collective_rpc(_inverse_cdf_sampler)[0])
        # weights pushed straight into the engine's linears (`_direct_reload`), where its layout allows
        self.direct = self.in_process and cpu and sample_params.enforce_eager
        # fp32 engine logprobs are the policy's own (raw, before temperature): the flow may reuse them
        self.exact_logprobs = dtype == "float32"

    def generate(self, prompt_ids, cfg: GenerationConfig, seeds) -> list[list[Completion]]:
        from vllm import SamplingParams

        sps = [
            SamplingParams(
                n=cfg.k,
                temperature=0.0 if cfg.greedy else cfg.temperature,
                top_p=1.0 if cfg.greedy else cfg.top_p,
                max_tokens=cfg.max_tokens,
                stop=list(cfg.stop) or None,
                seed=s,
                logprobs=0 if cfg.logprobs else None,  # the sampled token's own logprob, where asked for
            )
            for s in seeds
        ]
        with self._eager():
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sps, use_tqdm=True)
        # With stop strings, vLLM's text ends before the stop string while its token ids keep the token that completed
        # it: the text is then the ids' decoding, as the transformers backend's and TRL's are (the reward scores what
        # the update trains on)
        decode = self.llm.get_tokenizer().decode if cfg.stop else None
        groups = []
        for out in outs:
            group = []
            for o in out.outputs:
                token_ids = list(o.token_ids)
                logprobs = None
                if cfg.logprobs:
                    logprobs = [float(step[t].logprob) for step, t in zip(o.logprobs or [], token_ids)]
                text = decode(token_ids, skip_special_tokens=True) if decode else o.text
                group.append(Completion(text, token_ids, logprobs, "length" if o.finish_reason == "length" else "stop"))
            groups.append(group)
        return groups

    def _eager(self):
        """With `sample.enforce_eager`, no torch.compile inside generate(): vLLM's sampler compiles the helper that
        ranks each sampled token's logprob (and the top-p/top-k one) with inductor on its first call, ~2.1 s of every
        engine's first generation on this CPU for a count that runs in microseconds eagerly (docs/design.md §7). The
        switch is dynamo's own (`torch._dynamo.config.disable`), only for the call; the tokens and logprobs are the
        same (the rank is not used)."""
        if not self.params.enforce_eager:
            return contextlib.nullcontext()
        import torch._dynamo

        return torch._dynamo.config.patch(disable=True)

    def update_weights(self, state_dict=None, path: str | None = None) -> None:
        if state_dict is not None and self.in_process:
            if not self._direct_push(state_dict):
                weights = [(name, t.detach().to(self.dtype)) for name, t in state_dict.items()]
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        elif state_dict is not None:  # the workers are other processes: hand the weights over through a file
            with weights_dir(state_dict) as tmp:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
        elif path is not None:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        else:
            raise ValueError("update_weights needs a state_dict or a checkpoint path")
        try:
            self.llm.collective_rpc(_refresh_lm_head)
        except Exception as exc:  # multiprocess mode without VLLM_ALLOW_INSECURE_SERIALIZATION=1
            log.warning("could not refresh the lm_head after reload (%s); logits may use stale weights", exc)
        self.llm.reset_prefix_cache()

    def _direct_push(self, state_dict) -> bool:
        """`_direct_reload` where it applies (an eager in-process engine on a CPU, the engines it is tested on): True
        when it pushed the weights. Where it refuses (nothing written) or fails part-way (the engine left mixed), the
        caller's full `reload_weights` follows, this push and every later one; said once."""
        if not self.direct:
            return False
        try:
            why = self.llm.collective_rpc(_direct_reload, args=({k: v.detach() for k, v in state_dict.items()},))[0]
        except Exception as exc:
            log.warning("the direct weight push failed (%s: %s); pushing through vLLM's reload_weights from now on",
                        type(exc).__name__, exc)
            why = "failed"
        else:
            if why is not None:
                log.info("weights are pushed through vLLM's reload_weights (~2x the time of the direct push): %s", why)
        self.direct = why is None
        return self.direct

    def close(self) -> None:
        import gc

        llm, self.llm = self.llm, None  # (closed: `_shared_state_goes_with_the_last_engine` counts it out)
        del llm
        gc.collect()
