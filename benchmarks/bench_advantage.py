"""Benchmark the leave-one-out advantage: polars vs torch vs a plain Python loop, against a memory copy.

    python benchmarks/bench_advantage.py [--prompts 1000000 --k 10 --loop-rows 100000 --repeats 3]

Data: `prompts * k` float64 rewards (default 10 M rows), prompt-major as the sample stage writes them.
- polars, `prompt_id` a 12-character string (the real schema) and, for comparison, an int64 group id:
  `stages.advantage.rloo_polars` (the stage's expression `loo_baseline`, then `advantage = r - baseline`).
- polars, the whole `compute_advantages` (validation: nulls, non-finite, duplicate keys; stats) for scale.
- torch: `rloo_torch` on the (prompts, k) tensor, and `rloo_torch_grouped` on flat rows + group ids.
- reference: `tensor.clone()` of the same (prompts, k) rewards, a plain memory copy.
- loop: plain Python over lists, timed on the first `--loop-rows` rows and extrapolated linearly.
Each timing is the best of `--repeats`. Peak RSS is the process's high-water mark (getrusage) after each
step, so it only grows. Prints a Markdown table; writes benchmarks/results/advantage.json.
Targets (issue): torch <= 3x the copy; polars <= 10x torch; both >= 50x faster than the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.advantage import compute_advantages, rloo_polars, rloo_torch, rloo_torch_grouped  # noqa: E402
from stages.params import AdvantageParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "advantage.json"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def loo_loop(pids: list, rewards: list[float]) -> list[float]:
    members = defaultdict(list)
    for i, p in enumerate(pids):
        members[p].append(i)
    adv = [0.0] * len(rewards)
    for idx in members.values():
        total = sum(rewards[i] for i in idx)
        for i in idx:
            adv[i] = 0.0 if len(idx) == 1 else rewards[i] - (total - rewards[i]) / (len(idx) - 1)
    return adv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--loop-rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    p, k, n = args.prompts, args.k, args.prompts * args.k

    rewards = torch.randn(p, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # (P, K)
    flat = rewards.flatten()  # (N,) prompt-major
    group = torch.arange(p).repeat_interleave(k)  # (N,) int64
    df_int = pl.DataFrame({"group": group.numpy(), "sample_idx": torch.arange(k).repeat(p).int().numpy(),
                           "rlhf_reward": flat.numpy()})
    df_str = df_int.select(pl.col("group").cast(pl.String).str.zfill(12).alias("prompt_id"),
                           pl.col("sample_idx"), pl.col("rlhf_reward"))
    rows, _rss = [], {}

    def record(name: str, seconds: float, note: str = "") -> None:
        rows.append({"method": name, "seconds": seconds, "rows_per_s": n / seconds, "peak_rss_mib": peak_rss_mib(),
                     "note": note})

    record("memory copy: tensor.clone()", best_of(lambda: rewards.clone(), args.repeats), "reference")
    record("torch: rloo_torch (P, K)", best_of(lambda: rloo_torch(rewards), args.repeats))
    record("torch: rloo_torch_grouped (N,) + ids", best_of(lambda: rloo_torch_grouped(flat, group), args.repeats))
    record("polars: prompt_id string", best_of(lambda: rloo_polars(df_str, group="prompt_id"), args.repeats))
    record("polars: int64 group id", best_of(lambda: rloo_polars(df_int, group="group"), args.repeats))
    record("polars: compute_advantages (stage, string ids)",
           best_of(lambda: compute_advantages(df_str, AdvantageParams(), None), args.repeats),
           "validation + LOO + stats")

    m = min(args.loop_rows, n)
    pids, rs = df_str["prompt_id"][:m].to_list(), df_str["rlhf_reward"][:m].to_list()
    loop_s = best_of(lambda: loo_loop(pids, rs), args.repeats) * n / m
    record("plain Python loop", loop_s, f"timed on {m:,} rows, x{n / m:g} (linear extrapolation)")

    # The two implementations agree on the full data.
    _, adv_t = rloo_torch(rewards)
    adv_p = rloo_polars(df_str, group="prompt_id")["advantage"].to_torch()
    max_diff = float((adv_p - adv_t.flatten()).abs().max())

    t = {r["method"]: r["seconds"] for r in rows}
    copy, torch_s = t["memory copy: tensor.clone()"], t["torch: rloo_torch (P, K)"]
    pol_s, pol_i = t["polars: prompt_id string"], t["polars: int64 group id"]
    targets = {
        "torch <= 3x memory copy": {"ratio": torch_s / copy, "met": torch_s <= 3 * copy},
        "polars (string ids) <= 10x torch": {"ratio": pol_s / torch_s, "met": pol_s <= 10 * torch_s},
        "polars (int ids) <= 10x torch": {"ratio": pol_i / torch_s, "met": pol_i <= 10 * torch_s},
        "torch >= 50x faster than loop": {"ratio": loop_s / torch_s, "met": loop_s >= 50 * torch_s},
        "polars (string ids) >= 50x faster than loop": {"ratio": loop_s / pol_s, "met": loop_s >= 50 * pol_s},
    }

    print(f"\nLOO advantage, {p:,} prompts x K={k} = {n:,} rows, float64; best of {args.repeats}; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"polars {pl.__version__}\n")
    print("| method | time (s) | M rows/s | x copy | peak RSS (MiB) | note |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.4f} | {r['rows_per_s'] / 1e6:.1f} | {r['seconds'] / copy:.1f} "
              f"| {r['peak_rss_mib']:.0f} | {r['note']} |")
    print("\n| target | ratio | met |\n|---|---:|---|")
    for name, v in targets.items():
        print(f"| {name} | {v['ratio']:.1f} | {'yes' if v['met'] else 'NO'} |")
    print(f"\nmax |polars - torch| = {max_diff:.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {"prompts": p, "k": k, "rows": n, "repeats": args.repeats, "loop_rows": m},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "polars": pl.__version__},
        "results": rows, "targets": targets, "max_abs_diff_polars_torch": max_diff,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
