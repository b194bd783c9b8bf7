"""Per-token logprobs of completions under a causal LM, batched: shared by score, update and evaluate.

Layout: prompts are left-padded to a common width P and completions right-padded to a common width C,
so every completion starts at column P. Position ids follow the attention mask (padding does not shift
positions). Logits at column t predict token t+1, so the completion tokens are predicted by columns
[P-1, P+C-1): only those C columns go through the lm_head (`logits_to_keep`), which skips the vocabulary
projection of every prompt position (49k x 576 per token for SmolLM2: ~20 % of the forward FLOPs).
"""

from __future__ import annotations

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
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, logits_to_keep=C + 1)
    return out.logits[:, :-1, :], targets, mask


def token_logprobs(model, prompts, completions, pad_id: int, with_entropy: bool = False):
    """Logprob of each completion token (B, C) (0 at padding) and the mask; differentiable when grad is on.

    With `with_entropy`, also the entropy of the policy at each completion position (no gradient).
    """
    logits, targets, mask = completion_logits(model, prompts, completions, pad_id)
    # fp32 log_softmax: bf16 autocast logits lose 0.01-0.1 nats otherwise.
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, mask, entropy


@torch.no_grad()
def sequence_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    progress: str | None = None,
) -> tuple[list[float], list[list[float]]]:
    """Summed logprob per completion and the per-token lists, in batches, no gradient."""
    from tqdm.auto import tqdm

    sums: list[float] = []
    per_token: list[list[float]] = []
    # Sort by length so each batch pads little; results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), len(completions[i])))
    res_sum: dict[int, float] = {}
    res_tok: dict[int, list[float]] = {}
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None or len(starts) < 2, leave=False):
        idx = order[s : s + batch_size]
        lp, mask, _ = token_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], pad_id)
        lp = lp.double()
        for row, m, i in zip(lp, mask, idx):
            res_sum[i] = float(row.sum())
            res_tok[i] = row[m].tolist()
    for i in range(len(prompts)):
        sums.append(res_sum[i])
        per_token.append(res_tok[i])
    return sums, per_token
