"""Precision of the KL's logprob passes on the default task: every way to get the policy's and the reference's
logprobs, held against fp32 for both, on the same completions.

The main job's trained policy (`train.checkpoint_dir`, so `dvc repro` first) samples K completions of held-out
prompts with the fp32 engine, as a round does on CPUs without AMX. Then on exactly those completions:

- policy logprobs from: the fp32 engine's own (the sampler's, what `score.policy_logprobs: auto` reuses on CPUs
  without AMX), a bf16 engine's (vLLM prompt logprobs of the same tokens: what `sample.dtype: bfloat16` with
  `score.policy_logprobs: sampler` gives), a trainer pass in fp32, a trainer pass in bf16 autocast (the default
  with a bf16 engine: on CPUs with AMX and on GPUs);
- reference logprobs from a pass in fp32 or in bf16 autocast (`score.dtype`).

Each combination's KL (`logp_policy - logp_ref` per sequence, `score.kl_level`) against the fp32/fp32 one: mean and
max |error| per sequence, the bias of the batch's mean KL, and what it does to the RLOO advantages of
`rlhf_reward = score - beta * kl` (mean |change|, the share of completions whose advantage changes sign).

    python benchmarks/precision.py [--prompts 32] [--params params.yaml]

Writes benchmarks/results/precision.json and precision.md (the table docs/design.md §7 quotes).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"

POLICY_SOURCES = ("fp32 engine", "bf16 engine", "fp32 pass", "bf16 pass")
REF_SOURCES = ("fp32 pass", "bf16 pass")


def rloo_advantages(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """A_k = r_k - mean of the other K-1 rewards of its prompt (groups: the prompt of each row): the pipeline's own
    `stages.advantage.rloo_torch_grouped`, in float64."""
    import torch

    from stages.advantage import rloo_torch_grouped

    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    _, adv = rloo_torch_grouped(torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(codes, dtype=torch.long))
    return adv.numpy()


def error_table(policy: dict[str, np.ndarray], ref: dict[str, np.ndarray], lengths: np.ndarray, score: np.ndarray,
                groups: np.ndarray, beta: float, kl_level: str = "sequence") -> list[dict]:
    """One row per (policy source, reference source): the KL's error against fp32/fp32 and its effect on the
    advantages. `policy`/`ref`: source -> summed logprob per sequence; the exact ones are "fp32 pass"."""
    def kl(p, r):
        d = p - r
        return d / np.maximum(lengths, 1) if kl_level == "token" else d

    exact = kl(policy["fp32 pass"], ref["fp32 pass"])
    adv_exact = rloo_advantages(score - beta * exact, groups)
    rows = []
    for ps, p in policy.items():
        for rs, r in ref.items():
            k = kl(p, r)
            err = k - exact
            adv = rloo_advantages(score - beta * k, groups)
            rows.append({
                "policy": ps, "reference": rs, "mean_abs_err": float(np.abs(err).mean()), "max_abs_err": float(np.abs(err).max()),
                "mean_kl": float(k.mean()), "bias": float(err.mean()),
                "adv_moved": float(np.abs(adv - adv_exact).mean()),
                "sign_flips": float((np.sign(adv) != np.sign(adv_exact)).mean()),
            })
    return rows


def engine_prompt_logprobs(sampler, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> np.ndarray:
    """The engine's summed logprobs of given completions: one prefill each (prompt + completion as the prompt,
    `prompt_logprobs=0`), the completion's positions summed. Raw logprobs (before temperature), as sampling gives."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    inputs = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, completion_ids)]
    with sampler._eager():
        outs = sampler.llm.generate(inputs, sp, use_tqdm=False)
    sums = []
    for out, p, c in zip(outs, prompt_ids, completion_ids):
        lps = out.prompt_logprobs[len(p):]
        sums.append(sum(float(step[t].logprob) for step, t in zip(lps, c)))
    return np.array(sums)


def measure(params, n_prompts: int) -> dict:
    import polars as pl
    import torch

    from stages.errors import PipelineError
    from stages.io import read_table
    from stages.logprobs import sequence_logprobs
    from stages.models import load_causal_lm, load_tokenizer
    from stages.rewards import build_rewards, combine, compute_rewards
    from stages.runtime import setup_torch
    from stages.sample import generation_config, make_sampler, sample_prompts
    from stages.score import completion_inputs, reward_inputs

    policy_dir = ROOT / params.train.checkpoint_dir
    if not (policy_dir / "config.json").is_file():
        raise PipelineError(f"{params.train.checkpoint_dir} holds no trained policy: run `dvc repro` (or `make repro`) first")
    ref_dir = ROOT / (params.score.ref_model or params.base.model_dir)
    prompts = read_table(ROOT / "data" / "prepared" / "eval.parquet").head(n_prompts)
    tok = load_tokenizer(policy_dir)
    timings = {}

    def engine(dtype: str):
        p = params.model_copy(update={"sample": params.sample.model_copy(update={"dtype": dtype})})
        return make_sampler(str(policy_dir), p, backend="vllm")

    t = time.perf_counter()
    fp32 = engine("float32")
    samples, _ = sample_prompts(fp32, tok, prompts, generation_config(params.sample), params.base.seed, 0, 0,
                                params.sample.max_model_len)
    fp32.close()
    timings["sample_s"] = time.perf_counter() - t
    samples = samples.filter(pl.col("completion_token_ids").list.len() > 0)
    prompt_ids, completion_ids = completion_inputs(samples, tok)
    policy = {"fp32 engine": np.array([sum(x) for x in samples["sampler_logprobs"].to_list()])}
    t = time.perf_counter()
    bf16 = engine("bfloat16")
    policy["bf16 engine"] = engine_prompt_logprobs(bf16, prompt_ids, completion_ids)
    bf16.close()
    timings["bf16_engine_s"] = time.perf_counter() - t

    ref: dict[str, np.ndarray] = {}
    device = setup_torch(params.base.device)  # the passes where the flow runs them
    pad = tok.pad_token_id
    for name, model_dir, out in (("policy", policy_dir, policy), ("reference", ref_dir, ref)):
        model = load_causal_lm(model_dir, "float32", device).eval()
        for dtype in ("float32", "bfloat16"):
            t = time.perf_counter()
            sums, _ = sequence_logprobs(model, prompt_ids, completion_ids, pad, params.score.batch_size,
                                        share=params.base.share_prompts, dtype=dtype)
            timings[f"{name}_{dtype}_s"] = time.perf_counter() - t
            out[f"{'fp32' if dtype == 'float32' else 'bf16'} pass"] = np.array(sums)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    rewards = build_rewards(params.score.rewards)
    texts, columns = reward_inputs(samples, prompts)
    keys = list(zip(samples["prompt_id"], samples["sample_idx"]))
    components = compute_rewards(rewards, texts, samples["completion"].to_list(), keys, None, **columns)
    score = np.asarray(combine(components, {r.name: r.weight for r in rewards}), dtype=np.float64)
    groups = np.array(samples["prompt_id"].to_list())
    lengths = np.array([len(c) for c in completion_ids])
    rows = error_table({k: policy[k] for k in POLICY_SOURCES}, ref, lengths, score, groups, params.score.beta,
                       params.score.kl_level)
    adv = rloo_advantages(score - params.score.beta * (policy["fp32 pass"] - ref["fp32 pass"]), groups)
    return {"rows": rows, "completions": int(samples.height), "prompts": int(prompts.height),
            "true_mean_kl": float((policy["fp32 pass"] - ref["fp32 pass"]).mean()), "adv_std": float(adv.std()),
            "engine_vs_pass_fp32": float(np.abs(policy["fp32 engine"] - policy["fp32 pass"]).max()),
            "timings": timings}


def defaults(params) -> tuple[str, str]:
    """The (policy source, reference source) the params resolve to on this machine."""
    from stages.loop.steps import sampler_logprobs_are_policys
    from stages.runtime import sampler_dtype, score_dtype

    sampler = sampler_dtype(params.sample.dtype, params.score)
    from_sampler = sampler_logprobs_are_policys(params.score.policy_logprobs, sampler == "float32",
                                                params.sample.temperature)
    passes = "fp32 pass" if score_dtype(params.score.dtype) == "float32" else "bf16 pass"
    policy = ("fp32 engine" if sampler == "float32" else "bf16 engine") if from_sampler else passes
    return policy, passes


def markdown(res: dict, meta: dict) -> str:
    label = {("fp32 engine", "bf16 pass"): "", ("bf16 pass", "bf16 pass"): " (TRL: both passes in bf16 autocast)",
             ("bf16 engine", "bf16 pass"): " (a bf16 engine's own logprobs)", ("fp32 pass", "fp32 pass"): " (exact)"}
    lines = [f"{meta['date']}, {meta['machine']}; the trained policy ({meta['policy']}) against the reference on "
             f"{res['completions']} completions it sampled (fp32 engine, {res['prompts']} held-out prompts x K); "
             f"true mean KL {res['true_mean_kl']:.3f} nats per sequence (fp32 passes), advantages' std "
             f"{res['adv_std']:.3f} (RLOO, beta {meta['beta']}). The fp32 engine's logprobs against the fp32 pass: "
             f"{res['engine_vs_pass_fp32']:.1e} nats max per sequence.", "",
             "| policy logprobs | reference pass | mean \\|KL error\\| per sequence | max | mean-KL bias | advantages moved "
             "(mean) | sign flips |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = "**" if (r["policy"], r["reference"]) == meta["default"] else ""
        lines.append(f"| {mark}{r['policy']}{mark}{label.get((r['policy'], r['reference']), '')} | {mark}{r['reference']}"
                     f"{mark} | {r['mean_abs_err']:.3f} | {r['max_abs_err']:.3f} | {r['bias']:+.3f} | "
                     f"{r['adv_moved']:.3f} | {100 * r['sign_flips']:.1f} % |")
    lines += ["", f"Bold: what params.yaml resolves to here ({meta['default'][0]} / {meta['default'][1]}). Seconds: "
              + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in res["timings"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from stages.runtime import preload_malloc

    if argv is None:  # with the malloc the training command runs with (tcmalloc where installed)
        preload_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts (x K completions)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import os

    from machine import describe
    from stages.io import write_json, write_text
    from stages.params import load_params
    from stages.runtime import configure_env

    os.chdir(ROOT)
    params = load_params(args.params)
    configure_env(params.base.threads)
    res = measure(params, args.prompts)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": describe(), "policy": params.train.checkpoint_dir,
            "beta": params.score.beta, "default": defaults(params)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"meta": meta, **res}, out / "precision.json")
    md = markdown(res, meta)
    write_text(md, out / "precision.md")
    print(md)


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
