"""Loading models and tokenizers from local directories, with clear errors, and chat-template rendering.

Nothing here downloads: every path must be a local transformers model directory (config.json +
weights + tokenizer), as `stages.prepare` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.errors import PipelineError


def _first_line(exc: BaseException) -> str:
    text = next(iter(str(exc).strip().splitlines()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_model_dir(path: str | Path, field: str = "base.model", fix: str | None = None) -> Path:
    """A local transformers model dir (has config.json), else a PipelineError naming `field` (and `fix` when the dir
    does not exist; by default: `python -m stages.prepare` for the dir it writes, `base.model_dir`, else the path:
    prepare makes no other model, and nothing is downloaded)."""
    path = Path(path)
    if not path.is_dir():
        fix = fix or ("run `python -m stages.prepare` (it writes this dir from base.model) or fix the path"
                      if field == "base.model_dir" else "fix the path (a local transformers model directory; nothing "
                      "is downloaded)")
        raise PipelineError(f"{field}: model directory {path} does not exist; {fix}")
    if not (path / "config.json").is_file():
        raise PipelineError(f"{field}: {path} has no config.json; point it at a transformers model directory")
    return path


def load_config(path: str | Path, field: str = "base.model"):
    from transformers import AutoConfig

    path = check_model_dir(path, field)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise PipelineError(f"{field}: cannot read {path}/config.json ({_first_line(exc)})") from None


def load_tokenizer(path: str | Path, field: str = "base.model", shown: str | Path | None = None):
    """The model dir's tokenizer; errors name `field` and `shown` (the dir a user gave, where `path` is a copy)."""
    from transformers import AutoTokenizer

    path = check_model_dir(path, field)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise PipelineError(f"{field}: cannot load a tokenizer from {shown or path} ({_first_line(exc)}); copy the "
                            "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it") from None
    try:
        probe = tok("Hello, world.", add_special_tokens=False)["input_ids"]
    except Exception as exc:
        raise PipelineError(f"{field}: the tokenizer in {shown or path} fails on plain text ({_first_line(exc)})") from None
    if not probe:
        # transformers 5 builds an empty tokenizer for a dir without tokenizer files, instead of raising
        raise PipelineError(f"{field}: {shown or path} has no usable tokenizer (it turns text into no tokens); copy the "
                            "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm_config_check(path: str | Path, field: str = "base.model"):
    """The config of a causal LM dir (without loading weights); errors name `field` otherwise."""
    config = load_config(path, field)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise PipelineError(f"{field}: {path} is a {archs[0]}, not a causal LM (...ForCausalLM); use a generative model")
    return config


def load_causal_lm(path: str | Path, dtype: str = "float32", device: Any = "cpu", field: str = "base.model"):
    """Load a causal LM for training/scoring, with eager attention (grouped-query heads without K/V copies where
    the model runs Llama's: `stages.attention`); errors name `field` when the dir is not a causal LM."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.attention import use_grouped_attention

    load_causal_lm_config_check(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=True, attn_implementation="eager",
            trust_remote_code=False,  # never a model dir's own code, and no prompt asking to run it
        )
    except Exception as exc:
        raise PipelineError(f"{field}: cannot load a causal LM from {path} ({_first_line(exc)})") from None
    use_grouped_attention(model)  # eager's arithmetic without copying K and V per query head (stages.attention)
    return model.to(device)


def own_memory(model) -> None:
    """Give every parameter of `model` its own (anonymous) memory, in place; tied weights stay tied.

    transformers maps a safetensors file copy-on-write: the weights it loads live in a private mapping of the file.
    That suits read-only models (the reference: no copy, the page cache shared), but the first in-place optimizer
    step then copies every weight page by page in page faults: 0.9 s of the first update for SmolLM2-135M against
    0.14 s for this copy (measured, docs/design.md §7). The trainer's model calls this once after loading."""
    import torch

    with torch.no_grad():
        for p in model.parameters():  # each Parameter once; tied ones are one object and stay so
            if p.device.type == "cpu":
                p.data = p.data.clone()


def with_bf16_linears(model):
    """A second module tree over `model`'s own tensors whose `nn.Linear` weights are bf16 copies (an lm_head tied to
    the embedding gets its own): for a fixed model's passes under bf16 autocast, which otherwise cast every linear
    weight at every pass, on the CPU a pass over memory (SmolLM2-135M's reference pass on 2 AMX cores: ~0.06 of ~0.7
    s, docs/design.md §7). The same numbers to the bit under autocast (it casts to exactly these); the norms,
    embeddings and biases are `model`'s own fp32 tensors, shared. Costs a bf16 copy of the linear weights. Only for
    inference of a model whose weights do not change (the reference): the copies are made once."""
    import copy

    import torch

    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}  # shared, not copied
    view = copy.deepcopy(model, memo)
    copies: dict[int, Any] = {}  # one bf16 copy per weight, however many linears share it
    for m in view.modules():
        if isinstance(m, torch.nn.Linear):  # (a weight tied to an embedding: untied here, the view's own)
            w = m.weight
            if id(w) not in copies:
                copies[id(w)] = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
            m.weight = copies[id(w)]
    return view.eval()


def disable_dropout(model) -> int:
    """Every dropout of `model` set to 0, as TRL's `disable_dropout: true` (TRL 1.16's default is false; its RLOOTrainer
    up to 0.19 always did it): the trainer's policy is
    then the function the engine samples and the scoring passes compute, and its update's logprobs are not noisy.
    The modules' rates change, not the model's config (a saved checkpoint keeps the model's own): a submodule that
    reads a rate from its config at run time (Falcon's `hidden_dropout`, Persimmon's and GPT-Neo's
    `attention_dropout`) gets a copy of that config with the rates at 0. The copy is taken now: a run-time switch
    (`use_cache`, the attention implementation) set on the model's config later does not reach those submodules,
    so set them first. Returns how many rates it zeroed."""
    import torch

    n = 0
    copies: dict[int, object] = {}  # id of a config with rates -> its copy without (one per config object)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p:
            m.p, n = 0.0, n + 1
        # rates that transformers' modules pass to a kernel or apply by hand: attention_dropout, dropout,
        # activation_dropout, residual_dropout, layerdrop, ...
        for name, rate in list(vars(m).items()):
            if _is_rate(name, rate):
                setattr(m, name, 0.0)
                n += 1
        cfg = vars(m).get("config")
        if m is model or not hasattr(cfg, "to_dict"):
            continue  # the model's own config is what a checkpoint saves and what `same_weights` compares
        if id(cfg) not in copies:
            rates = [name for name, rate in vars(cfg).items() if _is_rate(name, rate)]
            copies[id(cfg)] = _without(cfg, rates) if rates else cfg
            n += len(rates)
        m.config = copies[id(cfg)]
    return n


def _is_rate(name: str, value) -> bool:
    return isinstance(value, float) and value != 0.0 and ("dropout" in name or "pdrop" in name or name == "layerdrop")


def _without(cfg, rates: list[str]):
    """A shallow copy of config `cfg` with the fields `rates` at 0 (the original stays as it is)."""
    import copy

    out = copy.copy(cfg)
    for name in rates:
        setattr(out, name, 0.0)
    return out


# what two loads of one model dir may differ in without computing another function
_CONFIG_RUN_STATE = ("_name_or_path", "_model_name_or_path", "use_cache", "transformers_version", "dtype",
                     "torch_dtype", "output_attentions", "output_hidden_states", "return_dict")


def same_code(a, b) -> bool:
    """Two code objects with the same bytecode, names, constants and variable names: the same computation on the
    same attributes. transformers copies a module's code between models; `stages.fused` and `stages.attention`
    recognise Llama's this way."""
    return (a.co_code, a.co_names, a.co_consts, a.co_varnames) == (b.co_code, b.co_names, b.co_consts, b.co_varnames)


def same_weights(a, b) -> bool:
    """Whether two models are one function: the same config (but for run-time switches such as `use_cache` and
    where it was loaded from) and the same weights, tensor for tensor: names, dtypes, shapes and values.

    The trainer's policy before its first update, against the reference it was loaded from: then they are one
    function, and the round's KL is 0 without a reference pass (docs/design.md §7). A sharded (FSDP) model's
    weights are gathered first (a collective: every rank calls this, and every rank gets the same answer); a
    wrapped (LoRA) policy compares unequal, which only costs that pass."""
    import torch

    configs = [getattr(m, "config", None) for m in (a, b)]
    if not all(hasattr(c, "to_dict") for c in configs):
        return False
    ca, cb = ({k: v for k, v in c.to_dict().items() if k not in _CONFIG_RUN_STATE} for c in configs)
    if ca != cb:  # e.g. rope_theta, rms_norm_eps, a sliding window: the same weights, another function
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for name, x in sa.items():
        y = sb[name]
        if hasattr(x, "full_tensor"):  # an FSDP shard (DTensor)
            x = x.full_tensor()
        if type(x) is not torch.Tensor or type(y) is not torch.Tensor:  # e.g. a quantised weight: not compared
            return False
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device or not torch.equal(x, y):
            return False
    return True


def messages_for(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, messages: str | list[dict[str, str]]) -> str:
    """The prompt text as fed to the model: the model's own chat template with the generation prompt."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a template: plain concatenation of the turns.
    return "\n".join(m["content"] for m in messages) + "\n"
