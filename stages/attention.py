"""Grouped-query attention without copying keys and values per query head (docs/design.md §7).

transformers' eager attention (`eager_attention_forward` of Llama and the models that copy it: Mistral, Qwen2/3,
SmolLM2/3, ...) first repeats each key/value head for every query head of its group (`repeat_kv`: SmolLM2-135M has
9 query heads on 3 key/value heads, so K and V are copied 3x per layer and pass), then runs one batched matmul per
query head. `grouped_attention` does the same arithmetic with the group's query heads stacked as rows of one matmul
against their shared key/value head: the same dot products, the same mask, the same fp32 softmax, no copy of K or V,
and autograd saves K and V once instead of 3x. Measured by `python benchmarks/attention.py` on the default round
(2-core Xeon with AMX, bf16 autocast, 6 pairs): the scoring step 1.52 -> 1.39 s and the update 2.19 -> 2.11 s
(medians; the pairs' ratio 0.95x), the reference's and the policy's sequence logprobs the same to the bit.

`use_grouped_attention` installs it (as the attention implementation `rloo_grouped`, with eager's masks) on a model
whose every attention module runs Llama's eager code and none of whose modules branches on the implementation's name;
any other model (Gemma's soft-capping, gpt-oss's sinks, DeepSeek-V3.2's sparse attention, ...) keeps its own eager
attention. transformers does not save the implementation in a model's config: a policy saved from such a model loads
in vLLM or another process as any other.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

NAME = "rloo_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention with each key/value head's query heads as rows of one matmul.

    query (B, H, T, D), key and value (B, G, S, D) with H = G * r, attention_mask None or additive (B or 1, 1, T, S).
    Query head h attends with key/value head h // r, as `repeat_kv` pairs them: viewed as (B, G, r * T, D), the r
    heads of a group are consecutive rows. Returns eager's (B, T, H, D) output and no attention weights."""
    B, H, T, D = query.shape
    G, S = key.shape[1], key.shape[2]
    r = H // G
    if H != G * r or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1)):
        return _eager(module, query, key, value, attention_mask, scaling, dropout)
    q = query.reshape(B, G, r * T, D)  # heads g*r .. g*r + r - 1 of group g, in order: a copy of Q only
    w = torch.matmul(q, key.transpose(2, 3)) * scaling  # (B, G, r*T, S)
    if attention_mask is not None:
        w = (w.view(B, G, r, T, S) + attention_mask[:, :, None]).view(B, G, r * T, S)
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    # the same elements in the same order as eager's (B, H, T, S) weights: the same dropout draws
    w = F.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).view(B, H, T, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _eager(module, query, key, value, attention_mask, scaling: float, dropout: float):
    """transformers' Llama eager attention, for shapes `grouped_attention` does not take."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def _names_an_implementation(code) -> bool:
    """`code` (with its nested functions) holds the string "eager" or "sdpa": a forward that branches on the
    implementation's name (DeepSeek-V3.2's sparse attention builds its top-k mask only `if
    self.config._attn_implementation in ("eager", "sdpa")`), which another name would send down another path."""
    for c in code.co_consts:
        items = c if isinstance(c, tuple) else (c,)
        if any(isinstance(x, str) and x in ("eager", "sdpa") for x in items):
            return True
        if isinstance(c, types.CodeType) and _names_an_implementation(c):
            return True
    return False


def _runs_llama_eager(model) -> bool:
    """Every module of `model` that dispatches through transformers' attention interface is an attention module
    (with `num_key_value_groups`) defined next to an `eager_attention_forward` with Llama's code, no module's forward
    branches on the implementation's name, and there is at least one attention module."""
    from transformers.models.llama import modeling_llama

    from stages.models import same_code

    ref = modeling_llama.eager_attention_forward.__code__
    found = False
    for m in model.modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is not None and _names_an_implementation(code):
            return False
        dispatches = code is not None and "get_interface" in code.co_names
        if not (dispatches or hasattr(m, "num_key_value_groups")):
            continue
        eager = getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None)
        if not (hasattr(m, "num_key_value_groups") and hasattr(eager, "__code__") and same_code(eager.__code__, ref)):
            return False
        found = True
    return found


def use_grouped_attention(model) -> bool:
    """Run `model`'s eager attention as `grouped_attention` when every attention module of it runs Llama's eager
    code (same results, fewer copies); True when installed. A model loaded with another implementation (sdpa, flash)
    or with other attention code is left as it is."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("eager", NAME) or not _runs_llama_eager(model):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
