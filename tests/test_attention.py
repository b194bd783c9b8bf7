"""stages.attention: grouped-query attention without K/V copies against transformers' eager attention (the same
logits, in fp32 and under bf16 autocast, through the padded and the shared-prompt layouts; gradients to float
rounding), which models get it, and that `load_causal_lm` installs it without changing what a
saved model says."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.attention import NAME, grouped_attention, use_grouped_attention
from stages.logprobs import PromptCache, sequence_logprobs

CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, attn_implementation="eager")


def tiny(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **kw})).eval()


@pytest.fixture
def pair():
    eager = tiny()
    grouped = copy.deepcopy(eager)
    assert use_grouped_attention(grouped)
    assert grouped.config._attn_implementation == NAME and eager.config._attn_implementation == "eager"
    return eager, grouped


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 9), generator=g)
    att = torch.ones(3, 9, dtype=torch.long)
    att[0, :3] = 0  # left padding: the mask matters
    att[2, :1] = 0
    return ids, att


@pytest.mark.parametrize("autocast", [False, True])
def test_logits_match_eager(pair, autocast):
    eager, grouped = pair
    ids, att = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a = eager(input_ids=ids, attention_mask=att).logits
        b = grouped(input_ids=ids, attention_mask=att).logits
    assert a.dtype == b.dtype
    # the same dot products and softmax rows; only a GEMM's blocking could round them differently
    assert (a.float() - b.float()).abs().max() <= (1e-5 if not autocast else 2e-2)
    assert (a.float() - b.float()).abs().mean() <= (1e-6 if not autocast else 1e-3)


def test_gradients_match_eager(pair):
    eager, grouped = pair
    ids, att = batch()
    grads = []
    for m in pair:
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, attention_mask=att).logits
        logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        a, b = grads[0][n], grads[1][n]
        assert float((a - b).norm()) <= 1e-5 * float(a.norm()) + 1e-7, n


def test_function_gradients_match_eager_with_a_mask():
    """Function level (no gradcheck: eager's softmax runs in fp32 even for float64 inputs, so neither passes it):
    the gradients of Q, K and V against eager's on the same masked inputs, K and V summed over their query heads."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    B, G, r, T, S, D = 2, 2, 3, 4, 6, 5
    q0 = torch.randn(B, G * r, T, D, generator=g)
    k0, v0 = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
    mask = torch.zeros(B, 1, T, S)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min
    module = torch.nn.Module().eval()
    module.num_key_value_groups = r
    dout = torch.randn(B, T, G * r, D, generator=g)
    grads = []
    for f in (eager_attention_forward, grouped_attention):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        (f(module, q, k, v, mask, scaling=0.4)[0] * dout).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_pairs_each_query_head_with_its_groups_key_value_head():
    """Query head h attends with key/value head h // r, as transformers' `repeat_kv` pairs them (not h % G)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 4, 8, generator=g)
    k, v = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    want, _ = eager_attention_forward(module, q, k, v, None, scaling=0.3)
    got, _ = grouped_attention(module, q, k, v, None, scaling=0.3)
    assert got.shape == want.shape == (2, 4, 6, 8)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("share", [True, False])
def test_sequence_logprobs_match_eager_in_both_layouts(pair, share):
    """The scoring passes: left-padded prompts with their completions, and each prompt once with its K completions
    on its cached keys and values (a cache of one row per completion, concatenated with theirs in every layer)."""
    eager, grouped = pair
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8], [9, 10]]
    completions = [[11, 12, 13], [14], [15, 16], [17, 18, 19, 20]]
    for dtype in ("float32", "bfloat16"):
        a, ta = sequence_logprobs(eager, prompts, completions, 0, 4, share=share, dtype=dtype)
        b, tb = sequence_logprobs(grouped, prompts, completions, 0, 4, share=share, dtype=dtype)
        assert [len(t) for t in ta] == [len(t) for t in tb] == [3, 1, 2, 4]
        assert max(abs(x - y) for x, y in zip(a, b)) <= (1e-5 if dtype == "float32" else 0.05), dtype
    cache = PromptCache(grouped, prompts, 0)
    c, _ = sequence_logprobs(grouped, prompts, completions, 0, 4, share=True, prompt_cache=cache)
    a, _ = sequence_logprobs(eager, prompts, completions, 0, 4, share=True)
    assert max(abs(x - y) for x, y in zip(a, c)) <= 1e-5


def test_only_models_running_llamas_eager_attention_get_it():
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, attn_implementation="eager")
    assert use_grouped_attention(Qwen2ForCausalLM(Qwen2Config(**small)))  # Qwen2 copies Llama's eager attention
    gemma = Gemma2ForCausalLM(Gemma2Config(**small))  # soft-capped scores: another eager function
    assert not use_grouped_attention(gemma) and gemma.config._attn_implementation == "eager"
    # DeepSeek-V3.2's sparse attention builds its top-k mask only under the names "eager" and "sdpa"
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    sparse = DeepseekV32ForCausalLM(DeepseekV32Config(
        vocab_size=50, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, index_topk=3, index_n_heads=2, index_head_dim=16,
        attn_implementation="eager"))
    assert not use_grouped_attention(sparse) and sparse.config._attn_implementation == "eager"
    sdpa = tiny(attn_implementation="sdpa")
    assert not use_grouped_attention(sdpa) and sdpa.config._attn_implementation == "sdpa"
    no_attention = torch.nn.Linear(2, 2)
    assert not use_grouped_attention(no_attention)


def test_load_causal_lm_installs_it_and_a_saved_config_does_not_name_it(tiny_model_factory, tmp_path):
    from stages.models import load_causal_lm

    d = tiny_model_factory(tmp_path / "m", num_attention_heads=4, num_key_value_heads=2)
    model = load_causal_lm(d)
    assert model.config._attn_implementation == NAME
    assert model.config.num_key_value_heads == 2
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert NAME not in json.dumps(saved)  # another process (vLLM, a user's transformers) loads it as usual
    again = load_causal_lm(tmp_path / "saved")
    assert again.config._attn_implementation == NAME


def test_sliding_window_model_and_cached_decoding_match_eager():
    """Mistral with a window shorter than the sequence (the window lives in eager's mask), and greedy decoding one
    token at a time on a cache (a query of one position against all keys)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    eager = MistralForCausalLM(MistralConfig(**{**CONFIG, "sliding_window": 4})).eval()
    grouped = copy.deepcopy(eager)
    assert use_grouped_attention(grouped)
    ids, att = batch()
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=att).logits
        b = grouped(input_ids=ids, attention_mask=att).logits
    assert (a - b).abs().max() <= 1e-5
    e, g = tiny(), tiny()
    assert use_grouped_attention(g)
    out = [m.generate(ids[1:], attention_mask=att[1:], max_new_tokens=6, do_sample=False, pad_token_id=0)
           for m in (e, g)]
    assert out[0].shape == (2, 15) and torch.equal(out[0], out[1])
