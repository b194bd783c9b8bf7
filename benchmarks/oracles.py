"""What the learning must be, written out once: the tests (tests/test_update.py, tests/test_sample.py) hold the
trainer and the samplers to these on tiny cases, benchmarks/learning_checks.py on the real default model.

- `textbook_rloo_backward`: the paper's REINFORCE step by hand on a plain transformers model (each whole sequence
  forwarded alone, `log_softmax` of the completion's logits, `loss = -mean_i(A_i * exp(logp_i - logp_i.detach()))`),
  none of the trainer's layout (shared prompts, lean-memory layers, micro-batches) in it.
- `capture_grads`, `rel`: the trainer's gradients as each optimizer step sees them, and a tensor's relative distance,
  to hold them to the textbook step's.
- `nll_minus_entropy`: whether completions are draws from a model at temperature 1 (the sampled tokens' mean NLL
  equals the model's entropy at their positions, up to sampling noise).
- `fitted_temperature`: the temperature the completions were drawn at, by maximum likelihood under the model, with
  its standard error: the same question as `nll_minus_entropy` (at temperature 1 the same test), answered on the
  temperature scale (how far from 1 the draws' temperature can be).
"""

from __future__ import annotations

import math


def textbook_rloo_backward(model, tokenizer, prompt_texts, completions, advantages) -> None:
    """Accumulates into `model`'s `.grad` the gradient of `-mean_i(A_i * exp(logp_i - logp_i.detach()))` over the
    completions (token ids) of `prompt_texts` (chat-templated text); one sequence at a time, fp32 `log_softmax`."""
    import torch

    n = len(completions)
    for text, completion, a in zip(prompt_texts, completions, advantages, strict=True):
        p, c = tokenizer(text, add_special_tokens=False)["input_ids"], list(completion)
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None]).sum()
        (-(a * torch.exp(logp - logp.detach())) / n).backward()


def capture_grads(trainer) -> list[dict]:
    """The gradients seen by each optimizer step of a `stages.update.Trainer` (after accumulation and clipping), by
    parameter name; the list fills as the trainer steps."""
    seen: list[dict] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )
    )
    return seen


def rel(a, b) -> float:
    """|a - b| / |b| (Frobenius norms; b's floored at 1e-30)."""
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def nll_minus_entropy(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                      chunk: int = 16) -> dict:
    """At every sampled position the expected NLL of the drawn token is the entropy of the model's distribution
    there, so over draws at temperature 1 the mean of `NLL - H` is 0 up to noise; a sampler that sharpens or
    flattens the distribution (another temperature, a truncation, a mismatched model) moves it by many standard
    errors. Returns {"mean", "se", "tokens", "logprobs"} (the last: each completion's token logprobs, for a
    comparison with a sampler's own)."""
    import torch

    from stages.logprobs import token_logprobs

    gaps: list[float] = []
    logprobs = []
    with torch.no_grad():
        for s in range(0, len(completions), chunk):
            logp, mask, entropy = token_logprobs(model, prompts[s : s + chunk], completions[s : s + chunk], pad_id,
                                                 with_entropy=True)
            gaps += (-logp - entropy)[mask].tolist()
            logprobs += [logp[i][mask[i]] for i in range(logp.shape[0])]
    mean = sum(gaps) / len(gaps)
    se = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps))
    return {"mean": mean, "se": se, "tokens": len(gaps), "logprobs": logprobs}


def fitted_temperature(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, passes: int = 2,
                       chunk: int = 16) -> dict:
    """The maximum-likelihood temperature T = 1/b of the draws under `model`: every completion token x at a position
    with logits z is taken as drawn from softmax(b z). Newton's method on b from b = 1, one forward pass over the
    completions per step (`passes`; the score is sum(z_x - E_b[z]), the information sum(Var_b(z))); a step that
    would take b to 0 or below is halved until it does not. Returns {"temperature", "se", "tokens", "steps",
    "last_step"}: `se` by the delta method from the information at the last pass's b (where the last Newton step
    started), `last_step` that step's size in b (small: converged). Draws at temperature 1 give 1 up to a few
    standard errors; a sampler that sharpens or flattens the distribution shifts it (0.5 for temperature 0.5, when
    `passes` lets Newton get there). At b = 1 the score is minus the sum of `nll_minus_entropy`'s gaps: the same
    test at temperature 1, its result read on the temperature scale."""
    import torch

    from stages.logprobs import completion_logits

    b, at, step, info, tokens = 1.0, 1.0, 0.0, 0.0, 0
    for _ in range(passes):
        score, info, tokens = 0.0, 0.0, 0
        with torch.no_grad():
            for s in range(0, len(completions), chunk):
                logits, targets, mask = completion_logits(model, prompts[s : s + chunk], completions[s : s + chunk],
                                                          pad_id)
                z = logits[mask.bool()].double()
                x = targets[mask.bool()]
                p = torch.softmax(b * z, -1)
                ez = (p * z).sum(-1)
                score += float((z.gather(-1, x[:, None])[:, 0] - ez).sum())
                info += float(((p * z * z).sum(-1) - ez**2).sum())
                tokens += int(x.numel())
        at, step = b, score / info
        while b + step <= 0:
            step /= 2
        b += step
    return {"temperature": 1 / b, "se": 1 / math.sqrt(info) / at**2, "tokens": tokens, "steps": passes,
            "last_step": step}
