"""The learning held to its definition on the real default model (what the held-out comparison with TRL leans on).

1. **The update is the paper's step.** One `Trainer.step` (shared prompts, lean-memory layers, selective logprobs,
   micro-batches, as the defaults run it; clipping off so the raw gradients compare) on K sampled completions of
   default prompts with random advantages, against the step written out by hand on a plain transformers model:
   each whole sequence forwarded alone, `log_softmax` of the completion's logits,
   `loss = -mean_i(A_i * exp(logp_i - logp_i.detach()))`. Reports each tensor's relative gradient difference.
2. **The samplers draw from the policy.** Completions of default prompts from the vLLM engine, from transformers'
   `generate` (the pipeline's `sample.backend: hf`, seeded Gumbel-max draws) and from TRL's own sampling path (an
   RLOOTrainer configured as the comparison's TRL arm: transformers' `generate(do_sample=True)` with TRL's
   generation config), at temperature 1: the mean over tokens of `NLL(sampled token) - entropy` is 0
   for draws from the policy (reported with its standard error), and the temperature fitted to the draws by maximum
   likelihood under the fp32 model is 1 (with its standard error: about 0.003 here; at temperature 1 the same test
   as NLL - H, read on the temperature scale); the engine's logprobs against
   the trainer's; its text against `decode(ids)`, and the reward of both texts.

    python benchmarks/learning_checks.py [--prompts 8] [--vllm-prompts 64] [--hf-prompts 32] [--trl-prompts 64]

Needs models/base and data/prepared (`dvc repro prepare`), and the `bench` extra (trl) for the TRL sampler
(`make bench-learning` installs it). Writes benchmarks/results/learning_checks.json and .md (~20 min on 2 AVX2 cores).
The tests hold the same properties on smaller cases (tests/test_update.py, tests/test_sample.py), against the same
oracles (benchmarks/oracles.py).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "models/base"
SEED = 7  # the seed of the pipeline samplers' draws and the update check's advantages (any); TRL's sampler seeds itself


def _samples(sampler, tok, prompts, params, rounds: int):
    import polars as pl

    from stages.sample import generation_config, sample_prompts

    return pl.concat([sample_prompts(sampler, tok, prompts, generation_config(params.sample), SEED, r, 0,
                                     params.sample.max_model_len)[0] for r in range(rounds)])


def trl_samples(params, tok, prompts, rounds: int):
    """Completions from TRL's own sampling path: an RLOOTrainer configured as the comparison configures its TRL arm
    (bench_trl.trl_config, bf16 autocast where the comparison turns it on), its model prepared by accelerate as
    `train()` prepares it (so `generate` runs under that autocast), and `_generate_single_turn` on each round's
    batches of prompts_per_round prompts x K, as its training step calls it: transformers' `generate(do_sample=True)`
    with TRL's generation config. TRL seeds itself with `base.seed` (its `set_seed`), not SEED. Returns (samples,
    seconds of sampling, bf16); TRL keeps no logprobs of its draws (`sampler_logprobs` is null) and the prompts'
    token ids are TRL's own (`prompt_token_ids`)."""
    import tempfile

    import polars as pl
    from bench_trl import trl_config
    from datasets import Dataset
    from trl import RLOOTrainer

    from stages.runtime import update_autocast
    from stages.sample import tokenize_prompts

    rendered, _ = tokenize_prompts(tok, prompts)
    k, per = params.sample.k, params.train.prompts_per_round
    bf16 = update_autocast(params.update.bf16_autocast)  # as bench_trl's TRL arm
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RLOOTrainer(model=MODEL, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
                              args=trl_config(params, 1, Path(tmp), bf16=bf16),
                              train_dataset=Dataset.from_dict({"prompt": rendered}), processing_class=tok)
        trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)
        rows = []
        t0 = time.perf_counter()
        for _ in range(rounds):
            for s in range(0, len(rendered), per):
                batch = [(i, t) for i, t in enumerate(rendered[s : s + per], start=s) for _ in range(k)]
                prompt_ids, images, fields = trainer._tokenize_prompts([t for _, t in batch])
                comps = trainer._generate_single_turn(prompt_ids, images, fields)
                for j, ((i, text), p_ids, ids) in enumerate(zip(batch, prompt_ids, comps, strict=True)):
                    rows.append({"prompt_id": prompts["prompt_id"][i], "sample_idx": j % k, "prompt_text": text,
                                 "prompt_token_ids": list(p_ids), "completion": tok.decode(ids, skip_special_tokens=True),
                                 "completion_token_ids": ids, "sampler_logprobs": None})
        seconds = time.perf_counter() - t0
    schema = {"prompt_id": pl.String, "sample_idx": pl.Int32, "prompt_text": pl.String,
              "prompt_token_ids": pl.List(pl.Int64), "completion": pl.String, "completion_token_ids": pl.List(pl.Int64),
              "sampler_logprobs": pl.List(pl.Float64)}
    return pl.DataFrame(rows, schema=schema), seconds, bf16


def sampler_check(backend: str, n_prompts: int) -> dict:
    """Check 2 for one sampler (run in its own process: one engine each): `vllm`, `hf` (the pipeline's backends)
    or `trl` (TRL's own generation path)."""
    import torch
    from oracles import fitted_temperature, nll_minus_entropy

    from stages.io import read_table
    from stages.models import load_causal_lm, load_tokenizer
    from stages.params import load_params
    from stages.rewards import build_rewards, combine, compute_rewards
    from stages.runtime import configure_env
    from stages.sample import make_sampler

    params = load_params(ROOT / "params.yaml", {"base.model_dir": MODEL, "sample.backend": "hf" if backend == "trl"
                                                else backend})
    configure_env(params.base.threads)
    tok = load_tokenizer(MODEL)
    train = read_table("data/prepared/train.parquet").head(n_prompts)
    bf16 = False
    if backend == "trl":
        df, seconds, bf16 = trl_samples(params, tok, train, rounds=2)
    else:
        sampler = make_sampler(MODEL, params)
        t0 = time.perf_counter()
        df = _samples(sampler, tok, train, params, rounds=2)
        seconds = time.perf_counter() - t0
        sampler.close()
    model = load_causal_lm(MODEL, "float32").eval()
    prompts = (df["prompt_token_ids"].to_list() if "prompt_token_ids" in df.columns else
               [tok(t, add_special_tokens=False)["input_ids"] for t in df["prompt_text"]])
    comps = [list(c) for c in df["completion_token_ids"]]
    draws = nll_minus_entropy(model, prompts, comps, tok.pad_token_id)
    fit = fitted_temperature(model, prompts, comps, tok.pad_token_id)
    worst = None if backend == "trl" else max(
        float((mine - torch.tensor(list(row))).abs().max())
        for mine, row in zip(draws["logprobs"], df["sampler_logprobs"], strict=True))
    texts = df["completion"].to_list()
    decoded = [tok.decode(c, skip_special_tokens=True) for c in comps]
    rewards = build_rewards(params.score.rewards, device=torch.device("cpu"), batch_size=params.score.batch_size)
    by_id = dict(zip(train["prompt_id"], train["prompt"]))
    keys = list(zip(df["prompt_id"], df["sample_idx"]))
    weights = {r.name: r.weight for r in rewards}

    def mean_reward(completions):
        scores = combine(compute_rewards(rewards, [by_id[p] for p in df["prompt_id"]], completions, keys), weights)
        return float(scores.mean())

    return {"backend": backend, "prompts": n_prompts, "completions": df.height, "tokens": draws["tokens"],
            "sample_s": seconds, "nll_minus_entropy": draws["mean"], "se": draws["se"], "max_logprob_diff": worst,
            "temperature": fit["temperature"], "temperature_se": fit["se"], "bf16_autocast": bf16,
            "text_differs": sum(a != b for a, b in zip(texts, decoded)), "reward": mean_reward(texts),
            "reward_of_decoded": mean_reward(decoded)}


def update_check(n_prompts: int, k: int) -> dict:
    """Check 1."""
    import polars as pl
    import torch
    from oracles import capture_grads, rel, textbook_rloo_backward

    from stages.io import read_table
    from stages.models import load_causal_lm
    from stages.params import load_params
    from stages.runtime import configure_env
    from stages.sample import make_sampler
    from stages.schemas import ADVANTAGES
    from stages.update import Trainer, training_batch

    params = load_params(ROOT / "params.yaml", {"base.model_dir": MODEL, "update.max_grad_norm": 0.0,
                                                "sample.k": k, "sample.backend": "hf"})
    configure_env(params.base.threads)
    trainer = Trainer(MODEL, params, torch.device("cpu"))
    tok = trainer.tokenizer
    sampler = make_sampler(MODEL, params)
    samples = _samples(sampler, tok, read_table("data/prepared/train.parquet").head(n_prompts), params, rounds=1)
    sampler.close()
    adv = torch.randn(samples.height, generator=torch.Generator().manual_seed(SEED)).tolist()
    advantages = samples.select("prompt_id", "sample_idx").with_columns(
        pl.lit(0.0).alias("rlhf_reward"), pl.lit(0.0).alias("baseline"), pl.Series("advantage", adv),
        pl.lit(params.advantage.estimator).alias("estimator")).select(list(ADVANTAGES))
    batch = training_batch(samples, advantages)
    seen = capture_grads(trainer)
    t0 = time.perf_counter()
    trainer.step(batch)
    step_s = time.perf_counter() - t0
    plain = load_causal_lm(MODEL, "float32")
    plain.train()
    textbook_rloo_backward(plain, tok, batch["prompt_text"], batch["completion_token_ids"], batch["advantage"])
    (got,) = seen
    diffs = sorted(((rel(got[n], q.grad), n) for n, q in plain.named_parameters()), reverse=True)
    norm = lambda grads: math.sqrt(sum(float(g.norm() ** 2) for g in grads))  # noqa: E731
    return {"prompts": n_prompts, "k": k, "completions": batch.height, "step_s": step_s, "tensors": len(diffs),
            "median_rel": diffs[len(diffs) // 2][0], "worst": diffs[:3],
            "trainer_norm": norm(got.values()), "textbook_norm": norm(q.grad for q in plain.parameters())}


def markdown(res: dict) -> str:
    from machine import describe

    u = res["update"]
    lines = [f"{res['date']}, {describe()}.", "",
             f"**The update is the paper's step.** One `Trainer.step` on {u['completions']} completions ({u['prompts']} "
             f"default prompts x K={u['k']}, random advantages), against the step written out by hand on a plain "
             f"transformers model: relative gradient difference per tensor, median {u['median_rel']:.1e}, worst "
             + ", ".join(f"{r:.1e} ({n})" for r, n in u["worst"])
             + f" over {u['tensors']} tensors; gradient norm {u['trainer_norm']:.4f} against {u['textbook_norm']:.4f}.",
             "", "**The samplers draw from the policy** (temperature 1; draws from the policy give NLL - H = 0 and "
             "a fitted temperature of 1 up to their standard errors; the fit, by maximum likelihood under the fp32 "
             "model, is the same test read on the temperature scale):", "",
             "| sampler | completions | tokens | NLL - entropy (nats a token) | fitted temperature | "
             "max \\|logprob - trainer's\\| | text != decode(ids) | reward (text / decoded) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in res["samplers"]:
        if "error" in s:
            lines.append(f"| {s['backend']} | failed: {s['error']} |||||||")
            continue
        lines.append(f"| {s['backend']}{' (bf16 autocast)' if s.get('bf16_autocast') else ''} | {s['completions']} | {s['tokens']} | {s['nll_minus_entropy']:+.3f} +- "
                     f"{s['se']:.3f} | {s['temperature']:.4f} +- {s['temperature_se']:.4f} | "
                     + ("- (keeps none)" if s["max_logprob_diff"] is None else f"{s['max_logprob_diff']:.1e}")
                     + f" | {s['text_differs']} | {s['reward']:.4f} / "
                     f"{s['reward_of_decoded']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="default prompts of the update check (x K=4)")
    ap.add_argument("--vllm-prompts", type=int, default=64, help="prompts of the vLLM sampler check (x K, 2 rounds)")
    ap.add_argument("--hf-prompts", type=int, default=32, help="prompts of the transformers sampler check")
    ap.add_argument("--trl-prompts", type=int, default=64,
                    help="prompts of TRL's own sampler check (0 = skip it; needs the bench extra)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", choices=["vllm", "hf", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(sampler_check(args.worker, args.n)), flush=True)
        return

    from machine import require_prepared

    from stages.io import write_json, write_text

    require_prepared(ROOT)
    samplers = []
    for backend, n in (("vllm", args.vllm_prompts), ("hf", args.hf_prompts), ("trl", args.trl_prompts)):
        if n <= 0:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] sampler check: {backend}, {n} prompts ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--worker", backend, "--n", str(n)], cwd=ROOT,
                           capture_output=True, text=True)
        last = (p.stdout.strip().splitlines() or [""])[-1]
        samplers.append(json.loads(last) if p.returncode == 0 else
                        {"backend": backend, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
    print(f"[{time.strftime('%H:%M:%S')}] update check ...", flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "update": update_check(args.prompts, 4), "samplers": samplers}
    out = Path(args.out)
    write_json(res, out / "learning_checks.json")
    md = markdown(res)
    write_text(md, out / "learning_checks.md")
    print(md)


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    from stages.errors import run_cli

    run_cli(main)
