"""Sampling benchmark: vLLM vs transformers `generate` on the same model, prompts, K and lengths.

Reports generated tokens/s, wall time and peak RSS of each configuration, the ratio vLLM / best transformers,
and this CPU's compute limit: a generated token costs ~2 x parameters FLOP, against the measured fp32 (and
bf16) matmul rate of the cores. Each backend runs in its own subprocess (clean peak memory, one engine).

    python benchmarks/bench_sample.py [--prompts 16] [--k 4] [--max-tokens 40] [--model models/base]

Writes benchmarks/results/sample.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_gflops(dtype_name: str, n: int = 1024, reps: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def run_one(backend: str, dtype: str, args) -> dict:
    """In a subprocess: build the sampler, warm it up, time one generate() over all prompts."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from stages.runtime import configure_env

    configure_env()
    import polars as pl

    from stages.models import load_tokenizer
    from stages.params import load_params
    from stages.prepare import clean_prompts, prompts_frame
    from stages.sample import GenerationConfig, make_sampler, tokenize_prompts

    params = load_params(ROOT / "params.yaml", {"sample.dtype": dtype, "sample.batch_size": args.hf_batch})
    prompts = prompts_frame(clean_prompts(pl.read_ndjson(ROOT / "data/prompts/movie_reviews.jsonl"), "prompts")[: args.prompts], None)
    tok = load_tokenizer(args.model)
    _, ids = tokenize_prompts(tok, prompts)
    t0 = time.perf_counter()
    sampler = make_sampler(args.model, params, backend)
    startup = time.perf_counter() - t0
    cfg = GenerationConfig(args.k, args.max_tokens, 1.0, 1.0)
    sampler.generate(ids[:2], GenerationConfig(1, 4), [0, 1])  # warm-up
    t0 = time.perf_counter()
    out = sampler.generate(ids, cfg, list(range(len(ids))))
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for g in out for c in g)
    return {
        "backend": backend, "dtype": dtype, "startup_s": startup, "seconds": seconds, "tokens": tokens,
        "tokens_per_s": tokens / seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--model", default=str(ROOT / "models/base"))
    parser.add_argument("--configs", default="vllm:float32,hf:float32,hf:bfloat16,vllm:bfloat16")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, dtype = args.one.split(":")
        print("RESULT " + json.dumps(run_one(backend, dtype, args)))
        return

    import torch

    results = []
    for conf in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", conf, "--prompts", str(args.prompts), "--k", str(args.k),
               "--max-tokens", str(args.max_tokens), "--hf-batch", str(args.hf_batch), "--model", args.model]
        print(f"running {conf} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        results.append(json.loads(line[7:]))

    n_params = 134_515_008  # SmolLM2-135M
    rates = {d: matmul_gflops(d) for d in ("float32", "bfloat16")}
    limit = {d: rates[d] * 1e9 / (2 * n_params) for d in rates}
    best_hf = max((r for r in results if r["backend"] == "hf"), key=lambda r: r["tokens_per_s"], default=None)
    best_vllm = max((r for r in results if r["backend"] == "vllm"), key=lambda r: r["tokens_per_s"], default=None)
    print(f"\n{args.prompts} prompts x K={args.k} x {args.max_tokens} tokens, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| backend | dtype | start-up s | generate s | tokens | tokens/s | peak RSS GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['backend']} | {r['dtype']} | {r['startup_s']:.1f} | {r['seconds']:.1f} | {r['tokens']} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    summary = {"results": results, "matmul_gflops": rates, "compute_limit_tokens_per_s": limit, "date": time.strftime("%Y-%m-%d")}
    if best_hf and best_vllm:
        summary["vllm_over_best_hf"] = best_vllm["tokens_per_s"] / best_hf["tokens_per_s"]
        dt = best_vllm["dtype"]
        summary["vllm_fraction_of_limit"] = best_vllm["tokens_per_s"] / limit[dt]
        print(f"\nvLLM / best transformers: {summary['vllm_over_best_hf']:.2f}x")
        print(f"matmul: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} GFLOP/s -> compute limit "
              f"{limit[dt]:.0f} tokens/s ({dt}); vLLM reaches {100 * summary['vllm_fraction_of_limit']:.0f} %")
    out = ROOT / "benchmarks/results/sample.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
