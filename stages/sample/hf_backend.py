"""transformers `generate` sampler: the fallback when vLLM is unavailable, and the tests' reference.

Prompts are left-padded in batches of `sample.batch_size`; `num_return_sequences=K`. Logprobs come from
the raw logits (`output_logits=True`, before temperature/top-p), the same convention as vLLM's default.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from stages.models import load_causal_lm, load_tokenizer
from stages.runtime import resolve_dtype
from stages.sample import Completion, GenerationConfig


class HFSampler:
    name = "hf"

    def __init__(self, model_dir: str, sample_params, device="cpu"):
        self.params = sample_params
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, resolve_dtype(sample_params.dtype), self.device).eval()
        self.eos_ids = self._eos_ids()
        self.exact_logprobs = self.model.dtype == torch.float32

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def generate(self, prompt_ids, cfg: GenerationConfig, seeds) -> list[list[Completion]]:
        pad = self.tokenizer.pad_token_id
        bs = self.params.batch_size
        groups: list[list[Completion]] = []
        for start in tqdm(range(0, len(prompt_ids), bs), desc="hf generate", leave=False):
            batch = prompt_ids[start : start + bs]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=self.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
            torch.manual_seed(seeds[start])
            # greedy: one sequence per prompt, copied K times (transformers rejects num_return_sequences > 1)
            n_ret = 1 if cfg.greedy else cfg.k
            gen_kwargs = dict(do_sample=False) if cfg.greedy else dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=cfg.max_tokens,
                num_return_sequences=n_ret,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad,
                eos_token_id=sorted(self.eos_ids),
                stop_strings=list(cfg.stop) or None,
                tokenizer=self.tokenizer if cfg.stop else None,
                **gen_kwargs,
            )
            new = out.sequences[:, width:]  # (B*K, T)
            logits = torch.stack(out.logits, dim=1).float()  # (B*K, T, V), raw
            logp = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for i in range(len(batch)):
                group = []
                for j in range(cfg.k):
                    row = i * n_ret + (0 if cfg.greedy else j)
                    ids = new[row].tolist()
                    n, finish = self._cut(ids, cfg.stop)
                    text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                    group.append(Completion(text, ids[:n], logp[row, :n].tolist(), finish))
                groups.append(group)
        return groups

    def _cut(self, ids: list[int], stop: list[str]) -> tuple[int, str]:
        """Tokens actually generated and why it ended. A row that ended on a stop string is padded by
        generate() with pad_token_id, which may equal EOS: cut at the stop string first, then at EOS."""
        n_eos = next((t + 1 for t, tok in enumerate(ids) if tok in self.eos_ids), None)
        if stop:
            limit = n_eos or len(ids)
            for n in range(1, limit + 1):
                if any(s in self.tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stop):
                    return n, "stop"
        return (n_eos, "stop") if n_eos is not None else (len(ids), "length")

    def update_weights(self, state_dict=None, path: str | None = None) -> None:
        if state_dict is None:
            if path is None:
                raise ValueError("update_weights needs a state_dict or a checkpoint path")
            state_dict = load_causal_lm(path, "float32", "cpu").state_dict()
        self.model.load_state_dict({k: v.to(self.model.dtype) for k, v in state_dict.items()}, strict=False)

    def close(self) -> None:
        del self.model
