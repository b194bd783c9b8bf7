"""transformers `generate` sampler: the fallback when vLLM is unavailable, and the tests' reference.

Prompts are left-padded in batches of `sample.batch_size`, each repeated K times. Logprobs come from the
raw logits (`output_logits=True`, before temperature/top-p), the same convention as vLLM's default.

Seeds per prompt, not per batch: sampling is the Gumbel-max trick over temperature/top-p-processed logits, with
one `torch.Generator` per completion seeded from (prompt seed, k), and `generate` then takes the argmax. A
completion thus depends on its prompt's seed alone, not on which prompts share its batch or its process (the
property a round split over several ranks needs; docs/design.md §8). The draw is exact: argmax(logits/T + G),
G ~ Gumbel(0, 1), is a sample of softmax(logits/T) (https://arxiv.org/abs/1411.0030, §2). The noise is drawn on
the model's device (CPU and CUDA generators give different streams for a seed, and CUDA's depends on the GPU model:
a completion depends on its prompt's seed and the device, the same for every rank of a run on one kind of device).
Drawn on the CPU for a CUDA model, it held an H200's sampling of the default round at 2.4-3.4 s instead of 1.0 s,
and 6 rounds of 512 completions x 128 tokens did not finish in 5 minutes (4.3-4.7 s of sampling a round after the
fix; docs/design.md §7).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from stages.models import load_causal_lm, load_tokenizer
from stages.runtime import backend_dtype
from stages.sample import Completion, GenerationConfig


class SeededSampling:
    """A logits processor: temperature, top-p, then Gumbel noise from one generator per row (see the module doc)."""

    def __init__(self, temperature: float, top_p: float, seeds: list[int]):
        self.temperature, self.top_p = temperature, top_p
        self.seeds = seeds
        self.generators: list[torch.Generator] | None = None  # on the logits' device, made at the first step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # (rows, V)
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        dev = logits.device
        if self.generators is None:
            self.generators = [torch.Generator(device=dev).manual_seed(s) for s in self.seeds]
        u = torch.stack([torch.rand(logits.shape[-1], generator=g, dtype=torch.float64, device=dev)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return logits + gumbel.to(logits.dtype)


class HFSampler:
    name = "hf"

    def __init__(self, model_dir: str, sample_params, seed: int = 0, device="cpu"):
        self.params = sample_params
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, backend_dtype(sample_params.dtype), self.device).eval()
        self.eos_ids = self._eos_ids()
        self.exact_logprobs = self.model.dtype == torch.float32

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def generate(self, prompt_ids, cfg: GenerationConfig, seeds) -> list[list[Completion]]:
        from transformers import LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        bs = self.params.batch_size
        groups: list[list[Completion]] = []
        for start in tqdm(range(0, len(prompt_ids), bs), desc="hf generate", leave=False, disable=len(prompt_ids) <= bs):
            batch = prompt_ids[start : start + bs]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=self.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
            # greedy: one sequence per prompt, copied K times; sampled: each prompt's row repeated K times (generate
            # refuses num_return_sequences > 1 without do_sample, and the draw is ours)
            n_ret = 1 if cfg.greedy else cfg.k
            input_ids, attention = input_ids.repeat_interleave(n_ret, 0), attention.repeat_interleave(n_ret, 0)
            processors = LogitsProcessorList()
            if not cfg.greedy:
                row_seeds = [(s * 1_000_003 + j) % 2**63 for s in seeds[start : start + bs] for j in range(cfg.k)]
                processors.append(SeededSampling(cfg.temperature, cfg.top_p, row_seeds))
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=cfg.max_tokens,
                do_sample=False,  # the draw happens in SeededSampling: argmax of the noised logits
                logits_processor=processors,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad,
                eos_token_id=sorted(self.eos_ids),
                stop_strings=list(cfg.stop) or None,
                tokenizer=self.tokenizer if cfg.stop else None,
            )
            new = out.sequences[:, width:]  # (B*K, T)
            # the raw logits' logprob of each drawn token, a step at a time: stacking the steps made two more fp32
            # copies of every step's logits beside generate's own (B*K x T x V x 4 bytes each: 13 GB at 512 rows x
            # 128 tokens of a 49k vocabulary)
            logp = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, new[:, t, None]).squeeze(-1)
                                for t, step in enumerate(out.logits)], dim=1).cpu()
            new = new.cpu()  # one copy, not one sync per row below
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
