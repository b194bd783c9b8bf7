"""stages.update: policy_loss against the plain REINFORCE loss and by hand (clip, token aggregation), the Trainer
on the tiny model (direction of a step, zero advantages, gradient accumulation, PPO epochs, LoRA, NaN loss),
training_batch, and the CLI writing a checkpoint transformers loads (save/resume: tests/test_checkpoint.py)."""

from __future__ import annotations

import copy
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

from conftest import make_samples_table
from stages.errors import PipelineError
from stages.io import write_table
from stages.logprobs import sequence_logprobs
from stages.params import parse_params
from stages.schemas import ADVANTAGES, SAMPLES
from stages.update import Trainer, lr_lambda, policy_loss, training_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import oracles  # noqa: E402  (the learning's oracles, shared with benchmarks/learning_checks.py)
from oracles import capture_grads, rel  # noqa: E402

CPU = torch.device("cpu")
EPS = 0.2

# (prompt_id, sample_idx, user prompt, completion words, finish_reason); "stop" rows end with <eos>.
ROWS = [
    ("p0", 0, "write a short review of a film you liked", "the movie was great", "stop"),
    ("p0", 1, "write a short review of a film you liked", "a dull film with a terrible plot and the acting", "length"),
    ("p1", 0, "tell me about the best movie", "i loved it", "stop"),
    ("p1", 1, "tell me about the best movie", "the story is slow but the ending is good", "length"),
]


# --- helpers -----------------------------------------------------------------------------------------------


def make_params(model_dir, **update):
    data = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    data["base"].update(model_dir=str(model_dir), device="cpu", threads=1)
    data["update"].update({"learning_rate": 1e-2, "weight_decay": 0.0, "bf16_autocast": False, **update})
    return parse_params(data, "test-params")


def make_samples(tokenizer, rows=ROWS) -> pl.DataFrame:
    return make_samples_table(tokenizer, rows)


def make_advantages(samples: pl.DataFrame, advantages: list[float]) -> pl.DataFrame:
    n = samples.height
    return samples.select("prompt_id", "sample_idx").with_columns(
        pl.Series("rlhf_reward", [0.0] * n, dtype=pl.Float64),
        pl.Series("baseline", [0.0] * n, dtype=pl.Float64),
        pl.Series("advantage", advantages, dtype=pl.Float64),
        pl.lit("rloo").alias("estimator"),
    )


def make_batch(trainer: Trainer, advantages: list[float], rows=ROWS) -> pl.DataFrame:
    samples = make_samples(trainer.tokenizer, rows)
    return training_batch(samples, make_advantages(samples, advantages))


def batch_logprobs(model, tokenizer, batch: pl.DataFrame) -> list[float]:
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch["prompt_text"]]
    completions = [list(c) for c in batch["completion_token_ids"]]
    return sequence_logprobs(model, prompts, completions, tokenizer.pad_token_id)[0]


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- policy_loss: pure math --------------------------------------------------------------------------------


def _random_logp(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    leaf = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    lengths = [6, 3, 1, 4][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0][:B])
    return leaf, mask, adv


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_ratio_one_gives_the_reinforce_gradient(aggregation):
    leaf, mask, adv = _random_logp()
    logp = leaf * mask  # as token_logprobs returns it: 0 at padding
    loss, clip = policy_loss(logp, logp.detach(), mask, adv, EPS, aggregation)
    (got,) = torch.autograd.grad(loss, leaf)
    logp2 = leaf * mask
    if aggregation == "sequence":
        reinforce = -(adv * logp2.sum(-1)).mean()  # -mean_i(A_i * sum_t logp_it)
        assert loss.item() == pytest.approx(-adv.mean().item())  # value at ratio 1: -mean(A)
    else:
        reinforce = -(adv[:, None] * logp2).sum() / mask.sum()
        assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item())
    (want,) = torch.autograd.grad(reinforce, leaf)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got[~mask].abs().max() == 0  # nothing flows into padding
    assert clip.item() == 0.0


def test_sequence_clip_binds_and_is_counted():
    # log-ratios +-0.5: ratio e^0.5 = 1.65 > 1.2 and e^-0.5 = 0.61 < 0.8
    log_ratio = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.1])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    leaf = torch.full((5, 2), -1.0, requires_grad=True)
    mask = torch.tensor([[True, True]] * 4 + [[True, False]])
    logp = leaf * mask
    old = (logp.detach() - torch.stack([log_ratio, torch.zeros(5)], -1) * mask)
    loss, clip = policy_loss(logp, old, mask, adv, EPS, "sequence")
    r = [math.exp(x) for x in log_ratio.tolist()]
    # row 0: A>0, r>1+eps -> clipped (1.2); row 1: A<0, r>1+eps -> unclipped (-r); row 2: A<0, r<1-eps -> clipped
    # (-0.8); row 3: A>0, r<1-eps -> unclipped (r); row 4: inside the range -> r*A
    terms = [1.2, -r[1], -0.8, r[3], 2 * r[4]]
    assert loss.item() == pytest.approx(-sum(terms) / 5, rel=1e-6)
    assert clip.item() == pytest.approx(2 / 5)
    (grad,) = torch.autograd.grad(loss, leaf)
    # d(-min)/d logp_it = -A_i r_i / B where unclipped binds, 0 where the clip binds, 0 at padding
    want = torch.tensor([[0.0, 0.0], [r[1] / 5] * 2, [0.0, 0.0], [-r[3] / 5] * 2, [-2 * r[4] / 5, 0.0]])
    torch.testing.assert_close(grad, want.float(), rtol=1e-5, atol=1e-7)


def test_token_aggregation_by_hand():
    logp_v = [[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]]
    old_v = [[-1.0, -2.5, -0.2], [-2.0, -1.1, 0.0]]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = [2.0, -1.0]
    leaf = torch.tensor(logp_v, requires_grad=True)
    loss, clip = policy_loss(leaf * mask, torch.tensor(old_v), mask, torch.tensor(adv), EPS, "token")

    n = 5
    total, clipped, grad = 0.0, 0, [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            r = math.exp(logp_v[i][t] - old_v[i][t])
            a = adv[i]
            unc, clp = r * a, min(max(r, 1 - EPS), 1 + EPS) * a
            total += min(unc, clp)
            if clp < unc:
                clipped += 1
            else:
                grad[i][t] = -a * r / n
    assert clipped == 2  # (0, 1): A>0, r=1.65; (1, 0): A<0, r=0.37
    assert loss.item() == pytest.approx(-total / n, rel=1e-6)
    assert clip.item() == pytest.approx(clipped / n)
    (g,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(g, torch.tensor(grad), rtol=1e-5, atol=1e-7)


# --- Trainer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_step_moves_the_logprob_with_the_advantage(tiny_model_dir, sign):
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir), CPU)
    batch = make_batch(trainer, [sign], ROWS[:1])
    before = batch_logprobs(trainer.model, trainer.tokenizer, batch)[0]
    stats = trainer.step(batch)
    after = batch_logprobs(trainer.model, trainer.tokenizer, batch)[0]
    assert (after - before) * sign > 0.1, (before, after)
    assert stats["loss"] == pytest.approx(-sign)  # -mean(A * ratio), ratio 1
    assert stats["clip_ratio"] == 0.0 and stats["policy/approx_kl"] == 0.0
    assert stats["grad_norm"] > 0 and stats["learning_rate"] == pytest.approx(1e-2)
    assert trainer.round == 1


def test_the_update_trains_the_policy_at_the_sampling_temperature(tiny_model_dir):
    """The update's forward (its loss, its "old" logprobs, the KL's where it runs at scoring time) is of the logits
    divided by sample.temperature, the distribution the completions were drawn from (as TRL), not the raw ones."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base"].update(model_dir=str(tiny_model_dir), device="cpu", threads=1)
    data["sample"]["temperature"] = 0.5
    trainer = Trainer(str(tiny_model_dir), parse_params(data, "test-params"), CPU)
    batch = make_batch(trainer, [1.0, 1.0], ROWS[:2])
    prompts = [trainer.tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch["prompt_text"]]
    completions = [list(c) for c in batch["completion_token_ids"]]
    with torch.no_grad():
        lp, mask, _ = trainer.forward_model(prompts, completions)
    got = lp.double().sum(-1).tolist()
    pad = trainer.tokenizer.pad_token_id
    assert got == pytest.approx(sequence_logprobs(trainer.model, prompts, completions, pad, temperature=0.5)[0],
                                abs=1e-4)
    raw = sequence_logprobs(trainer.model, prompts, completions, pad)[0]
    assert max(abs(a - b) for a, b in zip(got, raw)) > 0.1


def test_zero_advantages_leave_weights_unchanged(tiny_model_dir):
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir), CPU)
    before = weights(trainer.model)
    stats = trainer.step(make_batch(trainer, [0.0] * len(ROWS)))
    assert stats["grad_norm"] == 0.0
    after = weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("setup", ["full", "weight_decay", "lora"])
def test_adamw_state_allocated_at_load_steps_as_the_lazy_one(tiny_model_dir, setup):
    """A fresh run's trainer (load_trainer) holds AdamW's zeros from the start; its steps, weights and optimizer
    state are bit for bit those of a trainer whose AdamW made them in its first step (docs/design.md §7): full
    fine-tuning, with weight decay, and LoRA (only the adapters trainable)."""
    from stages.update import load_trainer

    params = {"full": lambda: make_params(tiny_model_dir),
              "weight_decay": lambda: make_params(tiny_model_dir, weight_decay=0.1),
              "lora": lambda: lora_params(tiny_model_dir)}[setup]()
    torch.manual_seed(0)  # LoRA's adapters start random: the same start for both
    eager, meta = load_trainer(params, CPU)
    torch.manual_seed(0)
    lazy = Trainer(str(tiny_model_dir), params, CPU)
    assert meta is None and not lazy.optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(weights(eager.model).values(), weights(lazy.model).values()))
    trainable = [p for p in eager.model.parameters() if p.requires_grad]
    assert set(eager.optimizer.state) == set(trainable)
    assert all(float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
               for st in eager.optimizer.state.values())
    assert not eager.allocate_optimizer_state()  # once: a state already there (a resumed run's) is never replaced
    for advantages in ([1.0, -0.5, 0.3, 2.0], [-1.0, 0.5, 0.2, 0.1]):
        for t in (eager, lazy):
            t.step(make_batch(t, advantages))
    assert all(torch.equal(a, b) for a, b in zip(weights(eager.model).values(), weights(lazy.model).values()))
    es, ls = eager.optimizer.state_dict()["state"], lazy.optimizer.state_dict()["state"]
    assert es.keys() == ls.keys()
    for i in es:
        assert es[i].keys() == ls[i].keys()
        for k in es[i]:
            assert es[i][k].dtype == ls[i][k].dtype and es[i][k].device == ls[i][k].device, (i, k)
            assert torch.equal(es[i][k], ls[i][k]), (i, k)


def test_the_gradients_are_freed_once_the_optimizer_took_them(tiny_model_dir):
    """No gradient outlives its step: the next round's forward reuses their memory (docs/design.md §7)."""
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_mini_batches=2), CPU)
    grads = capture_grads(trainer)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    assert len(grads) == 2 and all(g for g in grads)  # each step saw its gradients
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_round_thinner_than_its_mini_batches_says_which_steps_it_did_not_take(tiny_model_dir, caplog):
    """More mini-batches than a round's rows (score.on_invalid: drop thinned it): the empty ones take no step, and
    a warning says so (the schedule still counts them); params refuse the setting where it is always so."""
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_mini_batches=6), CPU)
    grads = capture_grads(trainer)
    with caplog.at_level(logging.WARNING, logger="stages.update"):
        trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    assert len(grads) == 4  # one step a row
    assert [r.getMessage() for r in caplog.records if r.name == "stages.update"] == [
        "update: 2 of 6 mini-batches of round 1 were empty (4 completions for update.num_mini_batches=6): no "
        "optimizer step for them, though the learning-rate schedule counts them; lower update.num_mini_batches"]
    with pytest.raises(PipelineError, match=r"update.num_mini_batches: must be <= the completions of a round, "
                                            r"train.prompts_per_round x sample.k = 32 \(got 33\); each mini-batch"):
        make_params(tiny_model_dir, num_mini_batches=33)


def _accumulated(model_dir, gas, aggregation):
    trainer = Trainer(str(model_dir), make_params(model_dir, gradient_accumulation_steps=gas, max_grad_norm=0.0,
                                                  loss_aggregation=aggregation), CPU)
    before = weights(trainer.model)
    grads = capture_grads(trainer)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    assert len(grads) == 1  # one mini-batch, one optimizer step
    return before, grads[0], weights(trainer.model)


def _check_accumulation(model_dir, aggregation):
    w0, g1, w1 = _accumulated(model_dir, 1, aggregation)
    _, g2, w2 = _accumulated(model_dir, 2, aggregation)
    for n in g1:
        assert rel(g2[n], g1[n]) < 1e-5, n
        # AdamW's first step is ~lr*sign(g): elements with |g| ~ adam eps amplify float noise, so compare the
        # update as a whole (measured up to 2.1e-4 for token-level aggregation; the gradients above agree to 1e-5)
        assert rel(w2[n] - w0[n], w1[n] - w0[n]) < 1e-3, n


def test_gradient_accumulation_matches_one_micro_batch(tiny_model_dir):
    _check_accumulation(tiny_model_dir, "sequence")


def test_gradient_accumulation_matches_one_micro_batch_token_level(tiny_model_dir):
    _check_accumulation(tiny_model_dir, "token")


def test_ppo_epochs_and_mini_batches(tiny_model_dir):
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_ppo_epochs=2, num_mini_batches=2), CPU)
    grads = capture_grads(trainer)
    stats = trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    assert len(grads) == 4  # 2 epochs x 2 mini-batches
    assert "clip_ratio" in stats and 0.0 <= stats["clip_ratio"] <= 1.0
    assert stats["clip_ratio"] > 0  # lr 1e-2 moves the ratios well past 1 +- 0.2 in the later steps
    assert stats["policy/approx_kl"] > 0
    assert all(math.isfinite(stats[k]) for k in ("loss", "grad_norm", "entropy"))
    state = trainer.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {4}
    assert trainer.scheduler.last_epoch == 4


ROWS3 = ROWS + [
    ("p2", 0, "name a film with a great soundtrack", "the music is wonderful and moving", "stop"),
    ("p2", 1, "name a film with a great soundtrack", "i do not remember any film", "length"),
]
ADV3 = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]


def _one_step_grad(model_dir, rows, advantages, **update):
    trainer = Trainer(str(model_dir), make_params(model_dir, max_grad_norm=0.0, **update), CPU)
    grads = capture_grads(trainer)
    stats = trainer.step(make_batch(trainer, advantages, rows))
    flat = torch.cat([g.flatten() for g in grads[0].values()])
    return flat, stats


def test_grad_variance_matches_per_prompt_gradients(tiny_model_dir):
    full, stats = _one_step_grad(tiny_model_dir, ROWS3, ADV3, grad_variance=True)
    plain, plain_stats = _one_step_grad(tiny_model_dir, ROWS3, ADV3)
    assert rel(full, plain) < 1e-5  # one micro-batch per prompt leaves the gradient as it was
    assert "grad/variance" not in plain_stats
    # each prompt's own gradient (its loss alone), then the unbiased trace of their covariance by hand
    per_prompt = [_one_step_grad(tiny_model_dir, ROWS3[i : i + 2], ADV3[i : i + 2])[0] for i in (0, 2, 4)]
    mean = torch.stack(per_prompt).mean(0)
    assert rel(mean, full) < 1e-5
    expected = float(sum(((g - mean) ** 2).sum() for g in per_prompt)) / (len(per_prompt) - 1)
    assert abs(stats["grad/variance"] - expected) / expected < 1e-4
    signal = float((full**2).sum()) - expected / len(per_prompt)
    assert stats["grad/signal"] == pytest.approx(signal, rel=1e-3)
    assert stats["grad/snr"] == pytest.approx(signal / expected, rel=1e-3)


def test_grad_variance_is_zero_when_every_prompt_pulls_the_same_way(tiny_model_dir):
    same = [r for r in ROWS[:2]] + [("p9", *r[1:]) for r in ROWS[:2]]  # a second prompt id, same rows
    _, stats = _one_step_grad(tiny_model_dir, same, [1.0, -0.5, 1.0, -0.5], grad_variance=True)
    assert stats["grad/variance"] < 1e-6 * stats["grad/mean_sq_norm"]


def lora_params(model_dir, **kw):
    return make_params(model_dir, use_lora=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"], **kw)


def test_lora_dropout_is_applied_as_set_with_a_warning(tiny_model_dir, caplog):
    """TRL's disable_dropout zeroes LoRA's dropout; here an explicit `update.lora_dropout` stays, and the load says
    what it costs (the update's logprobs a noisy copy of the sampled policy's); the default 0 says nothing."""
    import logging

    with caplog.at_level(logging.WARNING, logger="stages.update"):
        trainer = Trainer(str(tiny_model_dir), lora_params(tiny_model_dir, lora_dropout=0.1), CPU)
    assert "update.lora_dropout 0.1: the update's logprobs are a noisy copy" in caplog.text
    rates = {m.p for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n}
    assert rates == {0.1}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.update"):
        Trainer(str(tiny_model_dir), lora_params(tiny_model_dir), CPU)
    assert "lora_dropout" not in caplog.text


def test_lora_trains_only_the_adapters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = Trainer(str(tiny_model_dir), lora_params(tiny_model_dir), CPU)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    before = weights(trainer.model)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    after = weights(trainer.model)
    for n in before:
        if "lora_" not in n:
            assert torch.equal(before[n], after[n]), n  # base weights bit-identical
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sd = trainer.state_dict_for_sampler()
    assert set(sd) == set(plain.state_dict())
    # the merged weights are the adapted model: a plain model with them gives the same logits
    plain.load_state_dict(sd)
    ids = torch.tensor([trainer.tokenizer("<user> the movie was great <eos> <assistant> i loved it")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trainer.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits,
                                  plain(input_ids=ids).logits, atol=1e-4)


def test_lora_state_dict_for_sampler_leaves_base_weights_bit_identical(tiny_model_dir):
    trainer = Trainer(str(tiny_model_dir), lora_params(tiny_model_dir), CPU)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    before = weights(trainer.model)
    trainer.state_dict_for_sampler()
    after = weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_nan_advantage_stops_before_any_step(tiny_model_dir):
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir), CPU)
    before = weights(trainer.model)
    with pytest.raises(PipelineError, match=r"update: loss is nan at round 1"):
        trainer.step(make_batch(trainer, [1.0, float("nan"), 0.3, 2.0]))
    after = weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert trainer.round == 0 and not trainer.optimizer.state


def test_training_batch_joins_and_rejects_orphan_advantages(tiny_model_dir):
    from stages.models import load_tokenizer

    samples = make_samples(load_tokenizer(tiny_model_dir))
    adv = make_advantages(samples, [1.0, 2.0, 3.0, 4.0]).filter(pl.col("sample_idx") == 1)  # p0/0, p1/0 dropped
    batch = training_batch(samples, adv)
    assert list(zip(batch["prompt_id"], batch["sample_idx"], batch["advantage"])) == [("p0", 1, 2.0), ("p1", 1, 4.0)]
    assert batch["completion_token_ids"].to_list() == samples.filter(pl.col("sample_idx") == 1)["completion_token_ids"].to_list()
    orphan = pl.concat([adv, make_advantages(samples.head(2), [9.0, 8.0]).with_columns(pl.lit("p9").alias("prompt_id"))])
    with pytest.raises(PipelineError) as exc:
        training_batch(samples, orphan)
    assert str(exc.value) == ("advantages: prompt_id=p9 sample_idx=0 has no matching sample (2 rows); use the samples "
                              "file of the same round")
    # a repeated key: in the advantages each copy would be trained on, in the samples one of two silently
    twice = pl.concat([adv, adv.head(1)])
    with pytest.raises(PipelineError, match=r"^advantages: prompt_id=p0 sample_idx=1 appears more than once \(2 rows "):
        training_batch(samples, twice)
    with pytest.raises(PipelineError, match=r"^samples: prompt_id=p0 sample_idx=0 appears more than once"):
        training_batch(pl.concat([samples, samples.head(1)]), adv)


def test_advantages_scored_on_other_completions_with_the_same_keys_are_refused(tiny_model_dir):
    from stages.advantage import compute_advantages
    from stages.models import load_tokenizer
    from stages.params import AdvantageParams
    from stages.schemas import DIGEST, sample_digest

    samples = make_samples(load_tokenizer(tiny_model_dir))
    # the score stage writes the digest from its samples; the advantage stage carries it
    scores = make_advantages(samples, [0.0] * samples.height).with_columns(
        pl.Series("rlhf_reward", [1.0, 2.0, 3.0, 5.0]), sample_digest(samples))
    adv, _, _ = compute_advantages(scores, AdvantageParams(), None)
    assert adv[DIGEST].to_list() == sample_digest(samples).to_list()
    assert training_batch(samples, adv)["advantage"].to_list() == adv["advantage"].to_list()
    assert DIGEST not in training_batch(samples, adv).columns
    # another round's samples: the same keys, one completion differs
    ids = samples["completion_token_ids"].to_list()
    ids[2] = [*ids[2][:-1], ids[2][-1] + 1]
    other = samples.with_columns(pl.Series("completion_token_ids", ids, dtype=pl.List(pl.Int32)))
    with pytest.raises(PipelineError) as exc:
        training_batch(other, adv)
    pid, k = samples.row(2, named=True)["prompt_id"], samples.row(2, named=True)["sample_idx"]
    assert str(exc.value) == (f"advantages: prompt_id={pid} sample_idx={k} was scored on another completion than the "
                              f"samples file's (1 of 4 rows; `{DIGEST}` differs): score and advantage the samples you "
                              "train on, or use the samples file of the same round")
    # a table without the digest (an earlier version's, or built by hand) is not checked; a null digest neither
    assert training_batch(other, adv.drop(DIGEST)).height == 4
    assert training_batch(other, adv.with_columns(pl.lit(None, pl.String).alias(DIGEST))).height == 4


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_writes_a_checkpoint_transformers_loads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.models import load_tokenizer

    samples = make_samples(load_tokenizer(tiny_model_dir))
    s, a, out = tmp_path / "samples.parquet", tmp_path / "adv.parquet", tmp_path / "policy"
    write_table(samples, s, SAMPLES)
    write_table(make_advantages(samples, [1.0, -1.0, 0.5, -0.5]), a, ADVANTAGES)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(make_params(tiny_model_dir).model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.update", "--params", str(params), "--samples", str(s), "--advantages", str(a),
         "--out", str(out), "--state-dir", str(tmp_path / "state")], cwd=REPO, capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    from stages import checkpoint

    meta = checkpoint.read_meta(out)
    assert meta["round"] == 1 and checkpoint.state_file(tmp_path / "state", meta["checkpoint_id"]).is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed  # the update moved the weights
    assert checkpoint.load_state(tmp_path / "state", meta)["round"] == 1

    # the same command again starts from the base model: it would replace that checkpoint (and drop its optimizer
    # state), so it is refused, touching nothing; continuing it (`--policy` = `--out`) is what the stage does
    cmd = [sys.executable, "-m", "stages.update", "--params", str(params), "--samples", str(s), "--advantages", str(a),
           "--out", str(out), "--state-dir", str(tmp_path / "state")]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 2 and last.startswith("error: --out: ") and "holds a checkpoint" in last, again.stderr
    assert f"--policy {out} to continue it" in last and "Traceback" not in again.stderr
    assert checkpoint.read_meta(out) == meta and checkpoint.state_file(tmp_path / "state", meta["checkpoint_id"]).is_file()
    # continued on the advantages of half the samples: trained on those, with a warning counting the others
    half = tmp_path / "adv_half.parquet"
    write_table(make_advantages(samples, [1.0, -1.0, 0.5, -0.5]).head(2), half, ADVANTAGES)
    cont = subprocess.run([*cmd[:8], str(half), *cmd[9:], "--policy", str(out)], cwd=REPO, capture_output=True,
                          text=True, env=env)
    assert cont.returncode == 0, cont.stderr
    assert checkpoint.read_meta(out)["round"] == 2
    assert f"{s}: 2 of 4 samples have no advantage in {half} and are not trained on" in cont.stderr
    assert "have no advantage" not in again.stderr + proc.stderr
    # continued with another --state-dir: that option is named, with the fix for this stage (not a training run's)
    wrong = subprocess.run(cmd[:-1] + [str(tmp_path / "state_other"), "--policy", str(out)], cwd=REPO,
                           capture_output=True, text=True, env=env)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith(
        f"error: --state-dir: {tmp_path / 'state_other'}/state-"), wrong.stderr
    assert "give --state-dir the dir the checkpoint was written with" in wrong.stderr and "--restart" not in wrong.stderr
    # --out elsewhere without --state-dir: the state would land in the training run's train.state_dir
    no_state = subprocess.run(cmd[:-2] + ["--policy", str(out)], cwd=REPO, capture_output=True, text=True, env=env)
    assert no_state.returncode == 2 and no_state.stderr.strip().splitlines()[-1].startswith(
        f"error: --state-dir: give --out {out} a trainer-state dir of its own"), no_state.stderr
    assert checkpoint.read_meta(out)["round"] == 2
    # a training run's checkpoint (its state in the run's train.state_dir) continued into this stage's own --out and
    # --state-dir: the state is read from the run's dir, the new one written to --state-dir, the run's left as it was
    import json
    import shutil

    run_ckpt, run_state = tmp_path / "run_policy", tmp_path / "run_state"
    shutil.copytree(out, run_ckpt)
    meta_run = {k: v for k, v in checkpoint.read_meta(out).items() if k != "source"} | {"identity": "a" * 16}
    (run_ckpt / checkpoint.META).write_text(json.dumps(meta_run))
    run_state.mkdir()
    run_file = checkpoint.state_file(run_state, meta_run["checkpoint_id"])
    shutil.copy(checkpoint.state_file(tmp_path / "state", meta_run["checkpoint_id"]), run_file)
    run_params = tmp_path / "run_params.yaml"
    run_params.write_text(yaml.safe_dump(make_params(tiny_model_dir).model_dump(mode="json")
                                         | {"train": make_params(tiny_model_dir).train.model_dump(mode="json")
                                            | {"state_dir": str(run_state), "checkpoint_dir": str(run_ckpt)}}))
    before = run_file.read_bytes()
    mine = subprocess.run([sys.executable, "-m", "stages.update", "--params", str(run_params), "--samples", str(s),
                           "--advantages", str(a), "--policy", str(run_ckpt), "--out", str(tmp_path / "mine"),
                           "--state-dir", str(tmp_path / "mine_state")], cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert mine.returncode == 0, mine.stderr
    assert checkpoint.read_meta(tmp_path / "mine")["round"] == 3
    assert checkpoint.state_file(tmp_path / "mine_state", checkpoint.read_meta(tmp_path / "mine")["checkpoint_id"]).is_file()
    assert sorted(run_state.iterdir()) == [run_file] and run_file.read_bytes() == before

    # `--policy` naming base.model_dir is the default start, the base model; another model dir (no checkpoint.json)
    # is refused with how to start from it, touching nothing
    fresh = [sys.executable, "-m", "stages.update", "--params", str(params), "--samples", str(s), "--advantages", str(a),
             "--out", str(tmp_path / "from_base"), "--state-dir", str(tmp_path / "state2")]
    base_run = subprocess.run(fresh + ["--policy", str(tiny_model_dir)], cwd=REPO, capture_output=True, text=True,
                              env=env)
    assert base_run.returncode == 0, base_run.stderr
    assert checkpoint.read_meta(tmp_path / "from_base")["round"] == 1

    sft = shutil.copytree(tiny_model_dir, tmp_path / "sft")
    other = subprocess.run(fresh + ["--policy", str(sft), "--out", str(tmp_path / "from_sft")], cwd=REPO,
                           capture_output=True, text=True, env=env)
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1] == (
        f"error: --policy: {sft} is a model dir, not a checkpoint this pipeline wrote; to update it from its own "
        f"weights set base.model_dir: {sft} and leave --policy out"), other.stderr
    assert not (tmp_path / "from_sft").exists()
    typo = subprocess.run(fresh + ["--policy", str(tmp_path / "polcy"), "--out", str(tmp_path / "from_typo")],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1].startswith(
        f"error: --policy: {tmp_path / 'polcy'} holds no checkpoint (it does not exist or is empty)"), typo.stderr
    assert not (tmp_path / "from_typo").exists()



def test_the_stage_never_writes_into_a_training_run_s_checkpoint(tmp_path):
    """Not from the base model, and not continuing it either: the run's rounds and manifests would no longer match
    (the flow would load a checkpoint ahead of them, or replay over a step it never took)."""
    from stages import checkpoint
    from stages.io import write_json
    from stages.update import _check_out

    out = tmp_path / "policy"
    write_json({"format": checkpoint.FORMAT, "checkpoint_id": "c", "round": 4, "identity": "run-a"}, out / checkpoint.META)
    for policy in (None, out):
        with pytest.raises(PipelineError, match=r"^--out: .* holds the checkpoint of training run run-a \(round 4\); "
                                                r"this stage does not write into a run's checkpoint"):
            _check_out(out, policy, "--out")
    _check_out(tmp_path / "elsewhere", None, "--out")  # a new dir: fine


@pytest.mark.parametrize("schedule,expected", [
    # warm-up 2 steps over 10: (step + 1) / 2, then constant | linear | cosine decay over the remaining 8 steps
    ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 10: 1.0}),
    ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0}),
    ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 8: 0.5 * (1 + math.cos(3 * math.pi / 4)), 10: 0.0}),
])
def test_learning_rate_schedules_at_chosen_steps(schedule, expected):
    f = lr_lambda(2, 10, schedule)
    for step, want in expected.items():
        assert f(step) == pytest.approx(want), (schedule, step)


def test_schedule_reaches_the_optimizer(tiny_model_dir):
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, warmup_steps=2, lr_scheduler="linear"), CPU,
                      total_rounds=4)
    lrs = [trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))["learning_rate"] for _ in range(4)]
    assert lrs == pytest.approx([1e-2 * 0.5, 1e-2, 1e-2, 1e-2 * 0.5])  # steps 0-3 of 4, warm-up 2


def test_raising_the_rounds_continues_a_decaying_schedule_over_the_new_length(tiny_model_dir):
    """A run resumed with more rounds (a scheduled run that raised train.rounds) takes its next step at the new
    schedule's rate, not at the old schedule's last one (0 after a linear decay); with the same length, the saved
    rate to the bit."""
    params = make_params(tiny_model_dir, lr_scheduler="linear")
    trainer = Trainer(str(tiny_model_dir), params, CPU, total_rounds=2)
    lrs = [trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))["learning_rate"] for _ in range(2)]
    assert lrs == pytest.approx([1e-2, 0.5e-2])
    state = trainer.resume_state()
    longer = Trainer(str(tiny_model_dir), params, CPU, total_rounds=4)
    longer.load_resume_state(state)
    lrs = [longer.step(make_batch(longer, [1.0, -0.5, 0.3, 2.0]))["learning_rate"] for _ in range(2)]
    assert lrs == pytest.approx([0.5e-2, 0.25e-2])  # steps 2 and 3 of 4
    # the same length, mid-schedule, with warm-up: the saved rate to the bit
    params = make_params(tiny_model_dir, lr_scheduler="cosine", warmup_steps=1)
    trainer = Trainer(str(tiny_model_dir), params, CPU, total_rounds=7)
    for _ in range(3):
        trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    same = Trainer(str(tiny_model_dir), params, CPU, total_rounds=7)
    same.load_resume_state(trainer.resume_state())
    saved = trainer.optimizer.param_groups[0]["lr"]
    assert 0 < saved < 1e-2 and same.optimizer.param_groups[0]["lr"] == saved
    assert same.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


def test_grad_variance_by_hand():
    """Two prompt groups with gradients g1 = (1, 0), g2 = (0, 1) and shares 1/2 each, accumulated as the update does:
    G = (1/2, 1/2), ||G||^2 = 1/2, the one-prompt estimates' covariance trace (unbiased, weighted) = (1/2 * 1 +
    1/2 * 1 - 1/2) / (1 - 1/2) = 1, the signal ||G||^2 - var * sum w^2 = 0. One group has no variance to report."""
    from stages.loss import _GradVariance

    model = torch.nn.Linear(2, 1, bias=False)
    gv = _GradVariance(model)
    model.weight.grad = torch.tensor([[0.5, 0.0]])  # after group 1: w1 g1
    gv.add(0.5)
    assert gv.finish() == {}
    model.weight.grad = torch.tensor([[0.5, 0.5]])  # after group 2: w1 g1 + w2 g2
    gv.add(0.5)
    got = gv.finish()
    assert got == {"grad/variance": pytest.approx(1.0), "grad/mean_sq_norm": pytest.approx(0.5),
                   "grad/signal": pytest.approx(0.0, abs=1e-12), "grad/snr": pytest.approx(0.0, abs=1e-12)}


def test_the_paper_s_sequence_loss_is_the_default_and_one_token_counts_once():
    leaf, mask, adv = _random_logp()
    logp = leaf * mask
    old = logp.detach() - 0.05 * mask  # log-ratio 0.05 per token: the ratios differ between the two aggregations
    default, _ = policy_loss(logp, old, mask, adv, EPS)
    assert default.item() == pytest.approx(policy_loss(logp, old, mask, adv, EPS, "sequence")[0].item())
    assert default.item() != pytest.approx(policy_loss(logp, old, mask, adv, EPS, "token")[0].item())
    # token level over a batch with one real token: that token's term alone (divided by 1, not by a floor of 2)
    one = torch.zeros_like(mask)
    one[0, 0] = True
    r = math.exp(0.05)
    loss, clip = policy_loss(leaf * one, (leaf * one).detach() - 0.05 * one, one, adv, 0.01, "token")
    assert loss.item() == pytest.approx(-min(r * adv[0].item(), (1 + 0.01) * adv[0].item()), rel=1e-6)
    assert clip.item() == 1.0  # that one token is clipped (ratio 1.05 > 1.01 with A > 0)


def test_learning_rate_schedules_at_their_edges():
    # warm-up as long as the run: full rate after it (no decay left to do)
    assert [lr_lambda(2, 2, s)(3) for s in ("linear", "cosine")] == [1.0, 1.0]
    # past the last step the decay stays at its end, never below 0
    assert lr_lambda(0, 4, "linear")(6) == 0.0 and lr_lambda(0, 4, "cosine")(6) == pytest.approx(0.0)
    # one step to decay over: done after it
    assert lr_lambda(0, 1, "linear")(1) == 0.0 and lr_lambda(0, 1, "linear")(0) == 1.0


def test_approx_kl_by_hand_over_two_epochs(tiny_model_dir):
    """policy/approx_kl is the mean over a round's mini-batches of mean_t 0.5 (logp - logp_old)^2: with two epochs of
    one mini-batch, 0 in the first (the ratio is 1) and, in the second, that of the policy after one step against the
    round's start, computed here from a second trainer that took just that one step."""
    from stages.score import completion_inputs

    two = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_ppo_epochs=2), CPU)
    one = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_ppo_epochs=1), CPU)
    batch = make_batch(one, [1.0, -0.5, 0.3, 2.0])
    prompts, completions = completion_inputs(batch, one.tokenizer)
    per_token = lambda t: sequence_logprobs(t.model.eval(), prompts, completions, t.tokenizer.pad_token_id)[1]
    before = per_token(one)
    one.step(batch)
    after = per_token(one)
    sq = [(a - b) ** 2 for xs, ys in zip(after, before) for a, b in zip(xs, ys)]
    want = (0.0 + 0.5 * sum(sq) / len(sq)) / 2
    got = two.step(batch)["policy/approx_kl"]
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-3)


def _mapped_file(ptr: int) -> str | None:
    """The file a memory address is mapped from (Linux /proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_trainer_weights_are_not_the_files_copy_on_write_pages(tiny_model_dir):
    """transformers maps model.safetensors copy-on-write; the trainer copies its weights out once (the optimizer's
    first in-place step would otherwise fault every page in), keeping tied weights tied. A reference model loaded for
    reading keeps the mapping (checked too, so the test fails if transformers stops mapping: then the copy is moot)."""
    from stages.models import load_causal_lm

    ref = load_causal_lm(tiny_model_dir)
    assert any(str(_mapped_file(p.data_ptr())).endswith(".safetensors") for p in ref.parameters())
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir), CPU)
    assert [n for n, p in trainer.model.named_parameters() if _mapped_file(p.data_ptr())] == []
    tied = trainer.model.config.tie_word_embeddings
    assert (trainer.model.get_output_embeddings().weight is trainer.model.get_input_embeddings().weight) == tied
    for n, p in ref.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[n])


def test_the_policy_trains_without_dropout(tiny_model_dir, tmp_path):
    """As TRL's disable_dropout: a model with dropout in its config trains and scores as the function it samples."""
    import json
    import shutil

    d = shutil.copytree(tiny_model_dir, tmp_path / "dropout")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"attention_dropout": 0.5}))
    trainer = Trainer(str(d), make_params(d), CPU)
    assert trainer.model.training and trainer.model.config.attention_dropout == 0.5  # the config stays the model's
    # the layers' config copy without the rate, taken after the trainer's run-time switches
    inner = [m.config for m in trainer.model.modules() if getattr(m, "config", None) is not trainer.model.config
             and hasattr(getattr(m, "config", None), "to_dict")]
    assert inner and all(c.attention_dropout == 0.0 and c.use_cache is False for c in inner)
    batch = make_batch(trainer, [1.0], ROWS[:1])
    with torch.no_grad():
        a, b = (batch_logprobs(trainer.model, trainer.tokenizer, batch) for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # with the 0.5 dropout on, two passes differ


@pytest.mark.parametrize("arch", ["falcon", "persimmon"])
def test_no_dropout_where_a_layer_reads_its_rate_from_the_config(arch, tmp_path):
    """Falcon's decoder layer applies `config.hidden_dropout` and Persimmon's attention `config.attention_dropout`
    at run time (no module holds the rate): those layers get a copy of the config without the rates, while the model's
    own config, which a checkpoint saves and `same_weights` compares, keeps them."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.models import disable_dropout, same_weights

    rates = {"falcon": {"hidden_dropout": 0.5, "attention_dropout": 0.5},
             "persimmon": {"attention_dropout": 0.5, "hidden_dropout": 0.5}}[arch]
    cfg = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, **rates)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # the rates apply: two passes differ
        assert disable_dropout(model) >= len(rates)
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(getattr(model.config, k) == v for k, v in rates.items())  # the model's own config keeps them
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert all(saved[k] == v for k, v in rates.items())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert same_weights(model, again)  # the policy before its first update is still its reference


def test_a_step_is_the_textbook_rloo_step(tiny_model_dir):
    """End to end, one round's update (shared prompts, the lean-memory layers, the selective logprobs, micro-batches
    of mixed prompts and lengths, clipping, fused AdamW) against the paper's step written out by hand on a plain
    transformers model: each full sequence forwarded alone, `log_softmax` of the completion's logits,
    `loss = -mean_i(A_i * exp(logp_i - logp_i.detach()))`, the gradient's norm clipped, torch's plain AdamW."""
    from transformers import AutoModelForCausalLM

    rows = ROWS + [("p2", 0, "a movie", "fine", "stop"),
                   ("p2", 1, "a movie", "so so and then it went on and on", "length")]
    adv = [1.0, -0.5, 0.3, 2.0, -1.2, 0.4]
    params = make_params(tiny_model_dir, micro_batch_size=4, max_grad_norm=0.5, learning_rate=1e-3, weight_decay=0.01)
    assert params.base.share_prompts and params.update.fused_layers
    trainer = Trainer(str(tiny_model_dir), params, CPU)
    grads = capture_grads(trainer)
    batch = make_batch(trainer, adv, rows)
    stats = trainer.step(batch)

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    oracles.textbook_rloo_backward(plain, trainer.tokenizer, batch["prompt_text"], batch["completion_token_ids"],
                                   batch["advantage"])
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    assert norm > 0.5  # the clip binds: its scale is part of what is compared...
    assert stats["grad_norm"] == pytest.approx(float(norm), rel=1e-5)  # ...and the loss's own scale, which it hides
    (got,) = grads
    for n, q in plain.named_parameters():
        assert rel(got[n], q.grad) < 1e-5, n
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(params.update.adam_beta1, params.update.adam_beta2),
                            weight_decay=0.01)
    opt.step()
    mine = dict(trainer.model.named_parameters())
    for n, q in plain.named_parameters():  # AdamW's first step is ~lr * sign(g): an element whose |g| is at the
        # rounding's level may step either way on another CPU, so the weights are held to lr / 100
        torch.testing.assert_close(mine[n].detach(), q.detach(), rtol=1e-5, atol=1e-5, msg=n)


# --- the update's forward run at scoring time (score.policy_logprobs: update / auto) ----------------------------


def _counting_logp(trainer: Trainer) -> list:
    """Record every forward the trainer runs (`Trainer._logp`)."""
    calls, real = [], trainer._logp

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)
    trainer._logp = spy
    return calls


def test_a_forward_kept_from_scoring_makes_the_same_step_without_running_again(tiny_model_dir):
    """forward_ahead at scoring time, then step: the step runs no forward of its own and ends on the same weights,
    to the bit, as a trainer that ran its own; the logprobs it gave are the policy's (a pass over the same rows)."""
    kept, plain = (Trainer(str(tiny_model_dir), make_params(tiny_model_dir), CPU) for _ in range(2))
    batch = make_batch(kept, [1.0, -0.5, 0.3, 2.0])
    fp32_kl = kept.params.score.model_copy(update={"dtype": "float32"})  # the update's precision here
    assert kept.scoring_forward_refusal(fp32_kl, batch.height) is None
    calls = _counting_logp(kept)
    logp = kept.forward_ahead(batch)
    prompts = [kept.tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch["prompt_text"]]
    completions = [list(c) for c in batch["completion_token_ids"]]
    passed, _ = sequence_logprobs(kept.model, prompts, completions, kept.tokenizer.pad_token_id, batch.height)
    assert logp == pytest.approx(passed, abs=1e-5) and any(abs(x) > 0.1 for x in logp)
    assert calls == [4]
    stats_kept, stats_plain = kept.step(batch), plain.step(batch)
    assert calls == [4]  # the step ran no forward: it took the kept one
    a, b = weights(kept.model), weights(plain.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert stats_kept["loss"] == stats_plain["loss"] and stats_kept["entropy"] == stats_plain["entropy"]
    assert kept._ahead is None  # used once: the next step runs its own forward
    kept.step(batch)
    assert calls == [4, 4]


def test_a_kept_forward_of_other_rows_or_older_weights_is_not_used(tiny_model_dir):
    """A row dropped after scoring (score.on_invalid: drop), a step taken since the forward, or the same keys with
    other completions: step runs its own forward and makes the step a trainer without the kept one makes."""
    kept, plain = (Trainer(str(tiny_model_dir), make_params(tiny_model_dir), CPU) for _ in range(2))
    calls = _counting_logp(kept)
    kept.forward_ahead(make_batch(kept, [0.0] * 4))
    fewer = make_batch(kept, [1.0, -0.5, 0.3], ROWS[:3])
    kept.step(fewer), plain.step(fewer)
    assert calls == [4, 3]
    a, b = weights(kept.model), weights(plain.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    batch = make_batch(kept, [0.5, -1.0, 0.2, 1.0])
    kept.forward_ahead(batch)
    kept.round -= 1  # as if the weights it saw were an update older
    kept.step(batch)
    assert calls == [4, 3, 4, 4]
    # the same keys with other completions (a prompt sampled again in a later round)
    again = [(pid, k, prompt, "an other completion entirely", fin) for pid, k, prompt, _, fin in ROWS]
    kept.forward_ahead(make_batch(kept, [0.0] * 4, again))
    kept.step(batch)
    assert calls == [4, 3, 4, 4, 4, 4]


@pytest.mark.parametrize("update,score_dtype,expected", [
    ({}, "float32", None),
    ({"micro_batch_size": 0}, "float32", None),
    ({"num_ppo_epochs": 2}, "float32", "update.num_ppo_epochs is 2"),
    ({"num_mini_batches": 2}, "float32", "update.num_mini_batches is 2"),
    ({"gradient_accumulation_steps": 2}, "float32", "micro-batches of 2"),
    ({"micro_batch_size": 3}, "float32", "micro-batches of 3 (update.micro_batch_size 3"),
    ({"grad_variance": True}, "float32", "update.grad_variance"),
    ({}, "bfloat16", "score.dtype resolves to bfloat16 and the update runs in float32"),
])
def test_when_the_update_s_forward_can_be_the_kl_s_policy_pass(tiny_model_dir, update, score_dtype, expected):
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, **update), CPU)
    score = trainer.params.score.model_copy(update={"dtype": score_dtype})
    why = trainer.scoring_forward_refusal(score, 4)
    assert why == expected if expected is None else expected in why


def test_k_mini_batches_one_epoch_later_mini_batches_see_a_moved_policy(tiny_model_dir):
    """Several mini-batches of one epoch: the later ones take their ratio against the logprobs before the round's
    first step (TRL's "old" logprobs), so they see a moved policy; without them every ratio is 1 and the clip never
    binds."""
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_ppo_epochs=1, num_mini_batches=2), CPU)
    stats = trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    assert stats["policy/approx_kl"] > 0  # the 2nd mini-batch's ratio is not 1: the 1st step moved the policy


def test_schedule_length_counts_mini_batches(tiny_model_dir):
    """The learning-rate schedule counts one step per mini-batch: halfway through 2 rounds of 2 mini-batches the
    linear schedule is at half the rate, not at 0."""
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_mini_batches=2, lr_scheduler="linear"),
                      CPU, total_rounds=2)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-2)  # step 2 of 4, not 2 of 2 (= 0)


def test_epoch_shuffle_changes_with_the_round(tiny_model_dir, monkeypatch):
    """The mini-batch order of a later epoch is shuffled with a seed of (base.seed, round, epoch): it differs from
    round to round."""
    trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, num_ppo_epochs=2, num_mini_batches=2), CPU)
    seen = []
    orig = Trainer._accumulate

    def spy(self, batches, *a, **k):
        seen.append([tuple(b) for b in batches if b is not None])
        return orig(self, batches, *a, **k)

    monkeypatch.setattr(Trainer, "_accumulate", spy)
    for _ in range(3):
        trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    later = [tuple(seen[4 * r + 2] + seen[4 * r + 3]) for r in range(3)]  # epoch 2's order in rounds 0, 1, 2
    assert len(set(later)) > 1
