"""Per-token logprobs of completions under a causal LM, batched: shared by score, update and evaluate.

Layout: prompts are left-padded to a common width P and completions right-padded to a common width C,
so every completion starts at column P. Position ids follow the attention mask (padding does not shift
positions). Logits at column t predict token t+1, so the completion tokens are predicted by columns
[P-1, P+C-1): only those C columns go through the lm_head (`logits_to_keep`), which skips the vocabulary
projection of every prompt position (49k x 576 per token for SmolLM2: ~20 % of the forward FLOPs).

Shared prompts (`base.share_prompts`, docs/design.md §7): a round has K completions of each prompt, so
`shared_prompt_logprobs` runs each distinct prompt once and its completions on its cached keys and values; the
same arithmetic on K times fewer prompt tokens, differentiable, equal to the plain layout to float rounding
(tested). `LogprobModel` wraps a model so that both passes are one module call (what DDP and FSDP wrap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


def pad_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device):
    """input_ids, attention_mask, position_ids (B, P+C) and completion targets/mask (B, C)."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    C = max(max((len(c) for c in completions), default=0), 1)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + C), dtype=torch.long)
    mask = torch.zeros((B, C), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        attention[i, P - len(p) : P] = 1
        if len(c):
            input_ids[i, P : P + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            attention[i, P : P + len(c)] = 1
            mask[i, : len(c)] = True
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    targets = input_ids[:, P:]
    return (t.to(device) for t in (input_ids, attention, position_ids, targets, mask))


def completion_logits(model, prompts, completions, pad_id: int):
    """Logits predicting each completion token (B, C, V) and the targets/mask (B, C)."""
    device = next(model.parameters()).device
    input_ids, attention, position_ids, targets, mask = pad_batch(prompts, completions, pad_id, device)
    C = targets.shape[1]
    P = input_ids.shape[1] - C
    if P < 1:  # column P - 1 predicts the first completion token: there must be one
        raise ValueError("completion_logits: every prompt is empty; a completion needs a prompt token before it")
    # columns [P - 1, P + C - 1) only, as one contiguous (B, C, V) tensor (a slice of C + 1 kept columns was copied
    # again where the logprobs flatten it)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                logits_to_keep=torch.arange(P - 1, P + C - 1, device=device))
    return out.logits, targets, mask


def token_logprobs(model, prompts, completions, pad_id: int, with_entropy: bool = False, temperature: float = 1.0):
    """Logprob of each completion token (B, C) (0 at padding) and the mask; differentiable when grad is on.

    With `with_entropy`, also the entropy of the policy at each completion position (no gradient). `temperature`:
    of the distribution the completions were sampled from (`selective_logprobs`).
    """
    logits, targets, mask = completion_logits(model, prompts, completions, pad_id)
    return _masked(logits, targets, mask, with_entropy, temperature)


def _masked(logits, targets, mask, with_entropy: bool, temperature: float = 1.0):
    logp, entropy = selective_logprobs(logits, targets, with_entropy, temperature)
    return logp * mask, mask, entropy * mask if with_entropy else None


class _SelectiveLogprobs(torch.autograd.Function):
    """log_softmax(logits)[target] in fp32, a block of rows at a time: no fp32 copy of the (N, V) logits is kept.

    Forward: per block, the fp32 logsumexp (and the entropy `lse - sum(p * x)` when asked, no gradient, from the
    same exp pass: 0.07 -> 0.045 s for an update's 32 x 32 rows of 49k). Backward:
    per block, `g * (onehot(target) - softmax)`, the softmax recomputed in fp32 from the saved logits and logsumexp,
    the gradient written in the logits' dtype. The plain `log_softmax(logits.float()).gather(...)` keeps a (N, V)
    fp32 tensor for its backward and makes several more (N x 49k x 4 bytes: 200 MB for 32 completions of 32
    tokens); this keeps only the logits and N floats, and the fp32 blocks stay in cache (docs/design.md §7). On a
    GPU a block is larger (fewer kernel launches). `inv_t` (1 / temperature, 1.0 for none) scales each fp32 block
    as it is read: the logits themselves are never copied scaled."""

    @staticmethod
    def forward(ctx, logits, targets, with_entropy: bool, inv_t: float = 1.0):
        V = logits.shape[-1]
        flat, t = logits.reshape(-1, V), targets.reshape(-1)
        n = flat.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
        step = _block_rows(V, logits.device)
        for s in range(0, n, step):
            x = flat[s : s + step].float()
            if inv_t != 1.0:
                x = x.mul_(inv_t) if x.dtype != flat.dtype else x * inv_t  # .float() of bf16 logits is a copy
            if not with_entropy:
                lse[s : s + step] = torch.logsumexp(x, dim=-1)
                continue
            # one exp pass gives both: lse = m + log z, entropy = lse - sum(e * x) / z, e = exp(x - m), z = sum(e);
            # the lse in torch.logsumexp's own steps (an infinite max shifts by 0), so it is the same to the bit
            m = x.amax(-1, keepdim=True)
            m.masked_fill_(m.abs() == float("inf"), 0.0)
            e = (x - m).exp_()
            z = e.sum(-1)
            lse[s : s + step] = m.squeeze(-1) + z.log()
            ent[s : s + step] = lse[s : s + step] - e.mul_(x).sum(-1) / z
        logp = flat.gather(1, t[:, None]).squeeze(1).float() * inv_t - lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.inv_t = inv_t
        ent = ent.view(targets.shape) if with_entropy else ent
        ctx.mark_non_differentiable(ent)
        return logp.view(targets.shape), ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_ent):
        logits, targets, lse = ctx.saved_tensors
        V = logits.shape[-1]
        flat, t, g = logits.reshape(-1, V), targets.reshape(-1), g.reshape(-1).float()
        grad = torch.empty_like(flat)
        step = _block_rows(V, logits.device)
        inv_t = ctx.inv_t
        for s in range(0, flat.shape[0], step):
            # d/dx of x[t]/T - lse(x/T) is (onehot(t) - softmax(x/T)) / T; at T = 1 no extra pass over the block
            gs = g[s : s + step, None] * inv_t if inv_t != 1.0 else g[s : s + step, None]
            x = flat[s : s + step].float()
            if inv_t != 1.0:
                x = x.mul_(inv_t) if x.dtype != flat.dtype else x * inv_t  # fp32: .float() is the saved logits
            p = torch.exp(x - lse[s : s + step, None])
            p.mul_(-gs).scatter_add_(1, t[s : s + step, None], gs)
            grad[s : s + step] = p
        return grad.view_as(logits), None, None, None


def _block_rows(vocab: int, device: torch.device) -> int:
    """Rows of fp32 logits a block: ~4 MB on a CPU (stays in its cache), ~256 MB on a GPU (few kernel launches)."""
    return max(1, ((1 << 26) if device.type == "cuda" else (1 << 20)) // vocab)


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                       temperature: float = 1.0):
    """(..., V) logits, (...) targets -> the fp32 logprob of each target (differentiable) and, with `with_entropy`,
    the entropy at each position (no gradient; else None). Equal to `log_softmax(logits.float() / temperature)`
    gathered, to float rounding (tested); bf16 autocast logits lose 0.01-0.1 nats without the fp32. `temperature`:
    `sample.temperature`, the distribution the completions were drawn from, which the KL and the loss are about (as
    TRL divides the logits by it; docs/design.md §1)."""
    if not temperature > 0:
        raise ValueError(f"selective_logprobs: temperature must be > 0 (got {temperature})")
    logp, ent = _SelectiveLogprobs.apply(logits, targets, with_entropy, 1.0 / temperature)
    return logp, ent if with_entropy else None


def _precision(model, dtype: str):
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def completion_logprobs(model, prompts, completions, pad_id: int, with_entropy: bool = False, share: bool = True,
                        dtype: str = "float32", prompt_cache: PromptCache | None = None, temperature: float = 1.0):
    """(B, C) logprobs, mask, entropy: the shared-prompt layout when `share` (always with a `prompt_cache`), in
    `dtype` (bfloat16: autocast), of the distribution at `temperature` (`selective_logprobs`)."""
    with _precision(model, dtype):
        if prompt_cache is not None:
            if prompt_cache.dtype != dtype:
                raise ValueError(f"a prompt cache made in {prompt_cache.dtype} used for a {dtype} pass")
            if prompt_cache.model is not model:
                raise ValueError("a prompt cache made from another model: its keys and values are that model's")
            return shared_prompt_logprobs(model, prompts, completions, pad_id, with_entropy, prompt_cache, temperature)
        if share:
            return shared_prompt_logprobs(model, prompts, completions, pad_id, with_entropy, temperature=temperature)
        return token_logprobs(model, prompts, completions, pad_id, with_entropy, temperature)


class LogprobModel(torch.nn.Module):
    """A causal LM whose forward is `completion_logprobs`: one call per micro-batch, for DDP and FSDP to wrap."""

    def __init__(self, model, pad_id: int, share: bool = True, dtype: str = "float32", temperature: float = 1.0):
        super().__init__()
        self.model, self.pad_id, self.share, self.dtype, self.temperature = model, pad_id, share, dtype, temperature

    def forward(self, prompts, completions, with_entropy: bool = False):
        return completion_logprobs(self.model, prompts, completions, self.pad_id, with_entropy, self.share, self.dtype,
                                   temperature=self.temperature)


@torch.no_grad()
def sequence_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    progress: str | None = None,
    share: bool = True,
    dtype: str = "float32",
    prompt_cache: PromptCache | None = None,
    min_batches: int = 0,
    temperature: float = 1.0,
) -> tuple[list[float], list[list[float]]]:
    """Summed logprob per completion and the per-token lists, in batches, no gradient. `prompt_cache`: the model's
    keys and values of these prompts, computed earlier (`PromptCache`): only the completions are run.
    `temperature`: of the distribution the completions were drawn from (`selective_logprobs`).
    `min_batches`: run at least this many batches, the missing ones on a one-token input whose result is dropped:
    an FSDP model's every forward is a collective, so every rank must run as many as the rank with the most rows."""
    from tqdm.auto import tqdm

    if min_batches and prompt_cache is not None:  # a cached batch runs one forward, a padding batch two
        raise ValueError("sequence_logprobs: min_batches with a prompt_cache is not supported")
    sums: list[float] = []
    per_token: list[list[float]] = []
    # Sort by length so each batch pads little, a prompt's completions side by side (they share it); results go
    # back in input order.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), tuple(prompts[i]), len(completions[i])))
    res_sum: dict[int, float] = {}
    res_tok: dict[int, list[float]] = {}
    starts = range(0, len(order), batch_size)
    # one autocast region for all the batches keeps each weight's bf16 cast for the whole pass (a region per batch
    # casts every weight again: ~0.03 s a batch for SmolLM2-135M on 2 cores, docs/design.md §7)
    with _precision(model, dtype):
        for s in tqdm(starts, desc=progress, disable=progress is None or len(starts) < 2, leave=False):
            idx = order[s : s + batch_size]
            lp, mask, _ = completion_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], pad_id,
                                              share=share, dtype=dtype, prompt_cache=prompt_cache,
                                              temperature=temperature)
            lp = lp.double()
            for row, m, i in zip(lp, mask, idx):
                res_sum[i] = float(row.sum())
                res_tok[i] = row[m].tolist()
        for _ in range(min_batches - len(starts)):
            completion_logprobs(model, [[pad_id]], [[pad_id]], pad_id, share=share, dtype=dtype)
    for i in range(len(prompts)):
        sums.append(res_sum[i])
        per_token.append(res_tok[i])
    return sums, per_token


def shared_prompt_logprobs(model, prompts, completions, pad_id: int, with_entropy: bool = False,
                           prompt_cache: PromptCache | None = None, temperature: float = 1.0):
    """`token_logprobs` with each distinct prompt computed once and its KV cache shared by all its completions.

    A round has K completions per prompt, and the prompt is most of each sequence (~65 of ~97 tokens on the default
    task), so running the prompts once and the completions on top of their cached keys and values does the same
    arithmetic as `token_logprobs` on K times fewer prompt tokens. Differentiable: the cache is part of the graph,
    so a prompt's activations receive the gradients of all its completions. Returns the same (B, C) logprobs and mask.

    Layout: the U distinct prompts left-padded to P; their last position's logits predict each completion's first
    token; the completions (B, C), right-padded, run with the prompt cache gathered to their rows, positions
    continuing after their own prompt, attending to [their prompt | themselves].
    """
    device = next(model.parameters()).device
    B = len(prompts)
    C = max(max((len(c) for c in completions), default=0), 1)
    if prompt_cache is None:
        first_logits, cache, p_att = _prompt_pass(model, [tuple(p) for p in prompts], pad_id, device)
    else:  # computed once for these prompts: each row's own entry
        first_logits, cache, p_att = prompt_cache.take(prompts)
    c_ids = torch.full((B, C), pad_id, dtype=torch.long)
    c_att = torch.zeros((B, C), dtype=torch.long)
    mask = torch.zeros((B, C), dtype=torch.bool)
    for i, c in enumerate(completions):
        if len(c):
            c_ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            c_att[i, : len(c)] = 1
            mask[i, : len(c)] = True
    plen = p_att.sum(-1)  # (B,) real prompt tokens of each row
    c_pos = plen.unsqueeze(-1) + torch.arange(C).unsqueeze(0)
    att = torch.cat([p_att, c_att], dim=-1)
    c_ids, att, c_pos, mask = c_ids.to(device), att.to(device), c_pos.to(device), mask.to(device)
    # column t predicts token t + 1: the lm_head runs on columns [0, C - 1) only (the last one would predict past the
    # completion), and the first token's logprob comes from the prompt's logits, each scored where it lies: no
    # (B, C, V) concatenation of the two, which copied every logit again and, in the backward, its gradient too
    # (50 MB each in bf16 for a micro-batch of 16 completions of 32 tokens; docs/design.md §7)
    logits = model(input_ids=c_ids, attention_mask=att, position_ids=c_pos, past_key_values=cache, use_cache=False,
                   logits_to_keep=torch.arange(C - 1, device=device)).logits  # (B, C - 1, V)
    first, first_ent = selective_logprobs(first_logits.unsqueeze(1), c_ids[:, :1], with_entropy, temperature)
    rest, rest_ent = selective_logprobs(logits, c_ids[:, 1:], with_entropy, temperature)
    entropy = torch.cat([first_ent, rest_ent], dim=1) * mask if with_entropy else None
    return torch.cat([first, rest], dim=1) * mask, mask, entropy


def _left_padded(prompts: list[tuple], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for u, p in enumerate(prompts):
        ids[u, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        att[u, width - len(p):] = 1
    return ids, att, (att.cumsum(-1) - 1).clamp(min=0)


def _forward_prompts(model, prompts: list[tuple], pad_id: int, width: int, device):
    """`prompts` left-padded to `width` and forwarded once: the logits after each (U, V), their keys and values
    (transformers' cache of U rows) and their attention mask (U, width), on the CPU."""
    ids, att, pos = _left_padded(prompts, pad_id, width)
    out = model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], out.past_key_values, att


def _prompt_pass(model, prompts: list[tuple], pad_id: int, device):
    """Each distinct prompt forwarded once (left-padded); per row of `prompts`: the logits after its prompt (B, V),
    the keys and values (a cache of B rows) and the prompt's attention mask (B, P)."""
    keys: dict[tuple, int] = {}
    row_prompt = [keys.setdefault(p, len(keys)) for p in prompts]
    uniq = list(keys)
    first_logits, cache, p_att = _forward_prompts(model, uniq, pad_id, max(len(p) for p in uniq), device)
    rows = torch.as_tensor(row_prompt, dtype=torch.long)
    on_device = rows.to(device)
    _select_rows(cache, on_device)  # (U, ...) -> (B, ...): each row its prompt's keys and values
    return first_logits[on_device], cache, p_att[rows]


def _select_rows(cache, rows: torch.Tensor) -> None:
    """`cache.batch_select_indices(rows)`, with `index_select` for transformers' dynamic layers: the same rows, and
    in the update's backward an `index_add` instead of advanced indexing's `index_put` with accumulation, which on
    the CPU sorts the indices first (SmolLM2-135M's default round, a prompt's keys or values to its 4 completions'
    rows: ~1 ms a layer and tensor against ~0.1 ms; docs/design.md §7)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in cache.layers:
        if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.get_seq_length() > 0:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        else:
            layer.batch_select_indices(rows)


class PromptCache:
    """A fixed model's keys and values of fixed prompts, computed once, for passes that run only completions on them.

    The held-out evaluation scores new completions of the same prompts under the same reference at every in-training
    evaluation; its prompts are ~2/3 of the tokens of that fp32 pass (48 prompts: 4.8 -> ~1.7 s a pass on the 2-core
    CPU, docs/design.md §7). Holds the logits after each prompt and every layer's keys and values (48 prompts of ~70
    tokens for SmolLM2-135M: ~155 MB in fp32). Same arithmetic as the uncached pass, to float rounding (tested).
    Only for a model whose weights do not change (the reference).
    """

    def __init__(self, model, prompts, pad_id: int, batch_size: int = 16, dtype: str = "float32"):
        from transformers import DynamicCache

        self.model, self.dtype, self._cache_cls = model, dtype, DynamicCache
        uniq = list(dict.fromkeys(tuple(p) for p in prompts))
        self.index = {p: i for i, p in enumerate(uniq)}
        width = max(len(p) for p in uniq)
        device = next(model.parameters()).device
        logits, layers, atts = [], [], []
        with torch.no_grad(), _precision(model, dtype):
            for s in range(0, len(uniq), batch_size):
                first, cache, att = _forward_prompts(model, uniq[s : s + batch_size], pad_id, width, device)
                logits.append(first)
                layers.append([(layer.keys, layer.values) for layer in cache.layers])
                atts.append(att)
        self.first_logits = torch.cat(logits)
        self.layers = [(torch.cat([b[i][0] for b in layers]), torch.cat([b[i][1] for b in layers]))
                       for i in range(len(layers[0]))]
        # a sliding-window layer keeps only its last window's keys: the rebuilt cache would not line up with the
        # prompts' mask, so such models are not cached (the caller falls back to the full pass)
        if any(k.shape[-2] != width for k, _ in self.layers):
            raise ValueError("the model keeps a sliding window of keys and values: its prompts cannot be cached")
        self.p_att = torch.cat(atts)

    def take(self, prompts):
        """(B, V) logits after each row's prompt, a fresh cache of B rows, the (B, P) prompt mask."""
        try:
            rows = torch.as_tensor([self.index[tuple(p)] for p in prompts], dtype=torch.long)
        except KeyError:
            raise ValueError("a prompt that the prompt cache was not made for") from None
        on_device = rows.to(self.first_logits.device)
        cache = self._cache_cls([(k.index_select(0, on_device), v.index_select(0, on_device)) for k, v in self.layers],
                                config=self.model.config)
        return self.first_logits[on_device], cache, self.p_att[rows]
