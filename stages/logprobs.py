"""Per-token logprobs of completions under a causal LM, batched: shared by score, update and evaluate.

Given prompt token ids and completion token ids, each sequence is `prompt + completion`, right-padded
into a batch; one forward pass gives logits whose position t predicts token t+1, so the logprob of
completion token j sits at position `len(prompt) + j - 1`. Only completion positions are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask (B, T) and completion_mask (B, T): 1 where a position *predicts* a completion token."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lengths)
    B = len(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    predicts = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        # position t predicts token t+1: completion tokens at [len(p), len(seq)) are predicted by [len(p)-1, len(seq)-1)
        predicts[i, len(p) - 1 : len(seq) - 1] = True
    return input_ids.to(device), attention.to(device), predicts.to(device)


def token_logprobs(
    model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each completion token and the mask, both (B, T-1) aligned on predicted tokens.

    Differentiable when called with grad enabled. `temperature` divides the logits first (1.0 = raw,
    as vLLM reports by default).
    """
    device = next(model.parameters()).device
    input_ids, attention, predicts = pad_batch(prompts, completions, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1, :]  # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]  # (B, T-1)
    # log_softmax in fp32: bf16 autocast logits lose ~0.01-0.1 nats otherwise.
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = predicts[:, :-1]
    return logp * mask, mask


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


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
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None or len(starts) < 2, leave=False):
        lp, mask = token_logprobs(model, prompts[s : s + batch_size], completions[s : s + batch_size], pad_id)
        lp = lp.double()
        sums.extend(lp.sum(-1).tolist())
        for row, m in zip(lp, mask):
            per_token.append(row[m].tolist())
    return sums, per_token
