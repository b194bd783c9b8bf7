"""stages.fused (`update.fused_layers`): the lean-memory RMSNorm and SwiGLU MLP against transformers' own modules
(forward to the bit, gradients to float rounding, in fp32 and under bf16 autocast), gradcheck of the hand-written
backwards in float64, fewer bytes saved for the backward, which modules are (not) swapped, and the Trainer's step
with and without them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.fused import fuse_layers, rms_norm, swiglu_mlp

CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)


def tiny(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **kw}))
    with torch.no_grad():  # norms away from 1 so their weight gradient and scale matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def loss_and_grads(model, ids, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = logits.float().log_softmax(-1)[..., :-1, :].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def pair():
    plain = tiny()
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == 2 * 2 + 1 + 2  # two norms a layer, the final norm, one MLP a layer
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    return plain, fused, ids


def test_forward_is_bit_identical_and_gradients_match_in_fp32(pair):
    plain, fused, ids = pair
    lp, gp = loss_and_grads(plain, ids)
    lf, gf = loss_and_grads(fused, ids)
    assert torch.equal(lp, lf)
    assert gp.keys() == gf.keys() and len(gp) == len(list(plain.parameters()))
    for n in gp:
        assert rel(gf[n], gp[n]) < 1e-5, n


def test_gradients_match_under_bf16_autocast(pair):
    plain, fused, ids = pair
    lp, gp = loss_and_grads(plain, ids, autocast=True)
    lf, gf = loss_and_grads(fused, ids, autocast=True)
    assert lf.dtype == lp.dtype == torch.bfloat16
    assert torch.equal(lp, lf)  # the same bf16 matmuls in the same order
    for n in gp:
        assert gf[n].dtype == torch.float32  # fp32 master weights get fp32 gradients
        assert rel(gf[n], gp[n]) < 2e-2, n  # bf16 rounding of the backward's intermediates


def test_hand_written_backwards_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))
    wg, wu = (torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    wd = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_mlp, (x, wg, wu, wd))
    # a frozen weight gets no gradient and the others stay right (LoRA leaves the MLP's weights frozen)
    wg_frozen = wg.detach()
    assert torch.autograd.gradcheck(lambda x, wu, wd: swiglu_mlp(x, wg_frozen, wu, wd), (x, wu, wd))


def saved_bytes(model, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return total


def test_fewer_activations_are_kept_for_the_backward(pair):
    plain, fused, _ = pair
    ids = torch.randint(0, 97, (4, 64))
    tokens, layers, h, i = ids.numel(), CONFIG["num_hidden_layers"], CONFIG["hidden_size"], CONFIG["intermediate_size"]
    saved_plain, saved_fused = saved_bytes(plain, ids), saved_bytes(fused, ids)
    # per token and layer: the MLP keeps gate and up (not silu(gate) and the product too), each norm its input
    # and a row scale (not the normalized copy); the final norm likewise
    expected = 4 * tokens * (layers * (2 * i + 2 * h) + h)
    assert saved_plain - saved_fused >= 0.9 * expected


def test_only_recognised_modules_are_swapped():
    from peft import LoraConfig, get_peft_model

    assert fuse_layers(tiny(mlp_bias=True)) == 2 * 2 + 1  # an MLP with biases runs as it is (the norms still fuse)
    assert fuse_layers(tiny(hidden_act="gelu")) == 2 * 2 + 1
    lora = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["up_proj", "q_proj"]))
    assert fuse_layers(lora) == 2 * 2 + 1  # a LoRA-wrapped projection: its MLP keeps its own forward
    lora_attn = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert fuse_layers(lora_attn) == 2 * 2 + 1 + 2

    class GemmaLikeNorm(torch.nn.Module):  # (1 + weight) * x_hat: another formula under the same attributes
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    assert fuse_layers(torch.nn.Sequential(GemmaLikeNorm())) == 0

    from transformers.models.llama.modeling_llama import LlamaMLP

    class ScaledMLP(LlamaMLP):  # the same parts, another forward (Falcon-H1's multipliers, a clamp, a dropout...)
        def forward(self, x):
            return 0.5 * super().forward(x)

    config = LlamaConfig(**CONFIG)
    assert fuse_layers(torch.nn.Sequential(ScaledMLP(config))) == 0
    assert fuse_layers(torch.nn.Sequential(LlamaMLP(config))) == 1


def test_copies_of_the_llama_modules_in_other_models_are_swapped_and_stay_exact():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    plain = Qwen3ForCausalLM(Qwen3Config(**CONFIG))  # Qwen3's norms (also on q and k) and MLP are Llama's code
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == 2 * (2 + 2) + 1 + 2
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    lp, gp = loss_and_grads(plain, ids)
    lf, gf = loss_and_grads(fused, ids)
    assert torch.equal(lp, lf)
    for n in gp:
        assert rel(gf[n], gp[n]) < 1e-5, n


def test_trainer_step_is_the_same_with_and_without_fused_layers(tiny_model_dir):
    from test_update import capture_grads, make_batch, make_params, weights

    from stages.update import Trainer

    out = {}
    for fused in (False, True):
        trainer = Trainer(str(tiny_model_dir), make_params(tiny_model_dir, fused_layers=fused, max_grad_norm=0.0),
                          torch.device("cpu"))
        grads = capture_grads(trainer)
        stats = trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
        out[fused] = grads[0], stats
    (g0, s0), (g1, s1) = out[False], out[True]
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-5, n
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-6)


def _mlps(model):
    return [m for m in model.modules() if hasattr(m, "_keep_casts")]


def test_kept_casts_are_the_same_step_with_fewer_casts():
    """`keep_casts` (a CPU trainer's choice): the MLPs' bf16 weight casts made once while the weights do not change,
    and the backward's matmuls on them: the same logits and gradients to the bit as casting again, new casts once a
    weight is written in place or given new storage, none kept without autocast or without a gradient, and freed by
    `drop_kept_casts`."""
    from stages.fused import drop_kept_casts

    torch.manual_seed(0)
    base = tiny()
    recast, kept = copy.deepcopy(base), copy.deepcopy(base)
    fuse_layers(recast)
    fuse_layers(kept, keep_casts=True)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    lr, gr = loss_and_grads(recast, ids, autocast=True)
    lk, gk = loss_and_grads(kept, ids, autocast=True)
    assert torch.equal(lr, lk)
    for n in gr:
        assert gk[n].dtype == torch.float32 and torch.equal(gk[n], gr[n]), n
    assert not any("_casts" in m.__dict__ for m in _mlps(recast))
    mlp = _mlps(kept)[0]
    held = mlp._casts[3]
    assert [t.dtype for t in held] == [torch.bfloat16] * 3
    assert torch.equal(held[0], mlp.gate_proj.weight.detach().bfloat16())
    loss_and_grads(kept, ids, autocast=True)  # the weights did not change: the same casts, not new ones
    assert all(a is b for a, b in zip(mlp._casts[3], held))
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2.0)  # an optimizer step or a load writes in place: the version moves
    loss_and_grads(kept, ids, autocast=True)
    assert all(a is not b for a, b in zip(mlp._casts[3], held))
    assert torch.equal(mlp._casts[3][1], mlp.up_proj.weight.detach().bfloat16())
    held = mlp._casts[3]
    with torch.no_grad():
        mlp.down_proj.weight.data = mlp.down_proj.weight.data * 0.5  # new storage, the version counter not moved
    loss_and_grads(kept, ids, autocast=True)
    assert all(a is not b for a, b in zip(mlp._casts[3], held))
    assert torch.equal(mlp._casts[3][2], mlp.down_proj.weight.detach().bfloat16())
    drop_kept_casts(kept)
    assert not any("_casts" in m.__dict__ for m in _mlps(kept))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept(input_ids=ids)
    loss_and_grads(kept, ids, autocast=False)
    assert not any("_casts" in m.__dict__ for m in _mlps(kept))  # nothing to keep: no gradient, or no cast


def test_a_cpu_trainer_keeps_the_casts_for_its_backward_and_frees_them_before_its_step(tiny_model_dir, monkeypatch):
    from test_update import make_batch, make_params

    import stages.runtime
    from stages.update import Trainer

    monkeypatch.setattr(stages.runtime, "update_autocast", bool)  # bf16 autocast on any CPU (where it is emulated too)
    params = make_params(tiny_model_dir, micro_batch_size=2, bf16_autocast=True)
    trainer = Trainer(str(tiny_model_dir), params, torch.device("cpu"))
    assert trainer.autocast and params.update.fused_layers
    mlps = _mlps(trainer.model)
    assert mlps and all(m._keep_casts for m in mlps)
    shapes = {tuple(p.shape) for m in mlps for p in m.parameters()}
    made = []
    real = torch.Tensor.to

    def count(t, *args, **kwargs):  # the MLP weights' casts to bf16 made in Python (autocast's own are not seen)
        out = real(t, *args, **kwargs)
        if out.dtype == torch.bfloat16 and t.dtype == torch.float32 and tuple(t.shape) in shapes:
            made.append(tuple(t.shape))
        return out

    def step_casts():
        del made[:]
        monkeypatch.setattr(torch.Tensor, "to", count)
        try:
            trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))  # two micro-batches, one optimizer step
        finally:
            monkeypatch.setattr(torch.Tensor, "to", real)
        return len(made)

    held_at_step = []
    trainer.optimizer.register_step_pre_hook(lambda *_: held_at_step.append(any("_casts" in m.__dict__ for m in mlps)))
    assert step_casts() == 3 * len(mlps)  # once per weight for the step's two forwards and backwards
    assert held_at_step == [False]  # freed before the optimizer step (whose peak they would add to)
    for m in mlps:
        m._keep_casts = False
    # without: each MLP call's backward casts the three weights again, two calls a micro-batch (the shared-prompt
    # layout's prompt pass and completion pass)
    assert step_casts() == 2 * 2 * 3 * len(mlps)
