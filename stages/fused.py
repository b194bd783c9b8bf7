"""Lean-memory RMSNorm and SwiGLU MLP for the trainer (`update.fused_layers`, docs/design.md §7).

The update's peak memory is the saved activations of a micro-batch on top of weights, gradients and AdamW states.
Autograd through transformers' RMSNorm and gated MLP keeps every intermediate: per token and decoder layer the
norm's input, its normalized copy and output, and the MLP's gate output, `silu(gate)`, up output and their product
(4 x intermediate_size floats). These two autograd Functions compute the same forward and keep only what their
hand-written backward needs:

- `rms_norm`: the input and one `rstd` per row (the normalized copy is recomputed in the backward);
- `swiglu_mlp`: the gate and up outputs (`silu(gate) * up`, the down projection's input, is recomputed).

For SmolLM2-135M that is 4.2k of ~11.9k floats saved per token and layer. The arithmetic follows transformers'
own (the norm in fp32, the MLP's matmuls in the input's or autocast's dtype), so the forward is the same to the
bit and the gradients to float rounding (tests/test_fused.py). `fuse_layers` swaps the forward of the modules whose
own forward is transformers' Llama code (`_same_code`: Llama, Mistral, Qwen2/3, SmolLM3, Granite, ... copy it) and
whose parts fit: RMSNorm `weight * x * rsqrt(mean(x^2) + eps)`; an MLP of bias-free `gate_proj`, `up_proj`,
`down_proj` linears with SiLU. Any other module, e.g. Gemma's `(1 + weight)` norm, Falcon-H1's scaled MLP, a GELU
MLP or a LoRA-wrapped projection, runs as it is.

On the CPU (`fuse_layers(keep_casts=True)`, the Trainer's choice there) the MLP also keeps its weights' bf16 casts
under autocast from the forward for the backward, one cast per weight and optimizer step (`kept_casts`), where the
backward cast them again at every call: a bf16 copy of the MLP weights more at the backward for fewer passes over
memory, the same numbers to the bit.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _fp32_at_least(x):
    """transformers' `.to(torch.float32)`, except that float64 stays (the tests' gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = _fp32_at_least(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = _fp32_at_least(x) * rstd
        dw = None
        if ctx.needs_input_grad[1]:  # y = weight * xhat.to(x.dtype)
            dw = (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = _fp32_at_least(dy * weight)
            dx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, casts=None):
        # `casts`: the three weights already in autocast's dtype (`kept_casts`): the input is cast once for both
        # matmuls and the bf16 tensors are what the backward keeps, so it casts nothing again; the same matmuls
        if casts is not None:
            x = x.to(casts[0].dtype)
            w_gate, w_up, w_down = casts
        gate = F.linear(x, w_gate)
        up = F.linear(x, w_up)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return F.linear(F.silu(gate) * up, w_down)

    @staticmethod
    def backward(ctx, dout):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        # the matmuls in the forward's dtype, the gate's: under autocast without `casts` bf16 copies of the three
        # weights (made again here), otherwise no copy (`.to` of a tensor already in that dtype is the tensor itself)
        dtype = gate.dtype
        cast = lambda t: t.to(dtype)  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            sig = torch.sigmoid(gate)
            silu = gate * sig
            act = silu * up
            d2 = cast(dout.reshape(-1, dout.shape[-1]))
            dw_down = d2.t().mm(act.reshape(-1, act.shape[-1])) if ctx.needs_input_grad[3] else None
            dact = F.linear(d2, cast(w_down).t()).view_as(act)
            del act
            dup = dact * silu
            dgate = dact * up
            del dact
            # d silu(g) / dg = s (1 + g (1 - s)) = s + silu(g) (1 - s): one addcmul (one rounding) instead of four ops
            dgate.mul_(torch.addcmul(sig, silu, 1 - sig))
            del sig, silu
            x2 = cast(x.reshape(-1, x.shape[-1]))
            g2, u2 = dgate.reshape(-1, dgate.shape[-1]), dup.reshape(-1, dup.shape[-1])
            dx = None
            if ctx.needs_input_grad[0]:
                dx = (g2.mm(cast(w_gate)) + u2.mm(cast(w_up))).view(*x.shape[:-1], x.shape[-1])
            dw_gate = g2.t().mm(x2) if ctx.needs_input_grad[1] else None
            dw_up = u2.t().mm(x2) if ctx.needs_input_grad[2] else None
        return dx, dw_gate, dw_up, dw_down, None


def rms_norm(x, weight, eps: float):
    return _RMSNorm.apply(x, weight, eps)


def swiglu_mlp(x, w_gate, w_up, w_down, casts=None):
    return _SwiGLU.apply(x, w_gate, w_up, w_down, casts)


def _autocast_dtype(x) -> torch.dtype | None:
    """The dtype autocast would run a matmul of `x` in, where that is a cast (None: autocast off, or `x` in it or in
    float64, which autocast leaves alone)."""
    dev = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    dtype = torch.get_autocast_dtype(dev)
    return None if dtype == x.dtype else dtype


def kept_casts(module, x) -> tuple | None:
    """The MLP's three weights in autocast's dtype, cast once while they do not change, for a module swapped with
    `keep_casts` (a CPU trainer): None where there is nothing to keep (no autocast, no gradient). A forward runs the
    MLP twice (the shared-prompt layout's prompt pass and completion pass), and without these its backward cast the
    three weights again per call: on the CPU, where a cast is a pass over memory, 3 casts of the MLP's weights a
    round become 1 (docs/design.md §7). Valid while the weights are the same tensors, at the same version and
    storage (an optimizer step or `load_state_dict` writes them in place, which moves the version; `.data = ...` or
    `Module.to` gives new storage); the Trainer drops them (`drop_kept_casts`) before each optimizer step."""
    if not getattr(module, "_keep_casts", False) or not torch.is_grad_enabled():
        return None
    dtype = _autocast_dtype(x)
    if dtype is None:
        return None
    weights = (module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight)
    held = module.__dict__.get("_casts")
    state = tuple((w._version, w.data_ptr()) for w in weights)
    if held is not None and held[0] == dtype and held[2] == state and all(a is b for a, b in zip(weights, held[1])):
        return held[3]
    casts = tuple(w.detach().to(dtype) for w in weights)
    module._casts = (dtype, weights, state, casts)
    return casts


def drop_kept_casts(model) -> None:
    """Free the casts `kept_casts` holds (the backward that used them keeps its own references until it is done)."""
    for module in model.modules():
        module.__dict__.pop("_casts", None)


def _norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, kept_casts(self, x))


def _same_code(cls, reference) -> bool:
    """`cls.forward` is `reference.forward`'s code (transformers copies a module between models: Mistral, Qwen2/3,
    SmolLM3, Granite, ... share Llama's): the same bytecode, names and constants, so the same computation on the
    same attributes. A class that scales, clamps or drops out anywhere in its forward (Falcon-H1's or SeedOss's
    MLP, Gemma's `(1 + weight)` norm) has other code and runs as it is."""
    from stages.models import same_code

    a = getattr(cls.forward, "__code__", None)
    return a is not None and same_code(a, reference.forward.__code__)


def _is_llama_norm(module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return (_same_code(type(module), LlamaRMSNorm)
            and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_swiglu(module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaMLP

    if not _same_code(type(module), LlamaMLP):
        return False
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(type(p) is torch.nn.Linear and p.bias is None for p in parts)


def fuse_layers(model, keep_casts: bool = False) -> int:
    """Swap in the lean-memory forward on every recognised norm and MLP of `model`, in place; the number swapped.
    `keep_casts`: the MLPs keep their weights' autocast casts from the forward for the backward (`kept_casts`): the
    Trainer's choice on the CPU, with whole weights in one process (not FSDP's shards)."""
    n = 0
    for module in model.modules():
        if _is_llama_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            n += 1
        elif _is_swiglu(module):
            module.forward = types.MethodType(_mlp_forward, module)
            module._keep_casts = keep_casts
            n += 1
    return n
