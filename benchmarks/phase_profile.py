"""Per-phase times of the bare loop of stages on this machine's device (CPU or CUDA, synchronised), then a
cProfile of later rounds: where a round's time goes, e.g. on a GPU, where `make bench-roofline` (CPU peaks) does
not apply.

The loop is `benchmarks/bench_overhead.py`'s `bare` arm (`load_warm` once, then per round `sample_round ->
score_round -> advantage_round -> update_round`: no Prefect, Parquet, MLflow or checkpoint). The first `--rounds`
are timed only; the `--profile-rounds` after them run under cProfile (which slows Python-heavy code: compare their
phase times with the unprofiled rounds').

    python benchmarks/phase_profile.py [--params params.yaml] [--rounds 3] [--profile-rounds 2] [--out PREFIX]

Writes PREFIX.json (each round's phases, peak GPU memory where there is a GPU) and PREFIX.prof.txt (the profile,
by cumulative and by own time). Needs `dvc repro prepare` (the base model and the prepared prompts).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds before the profiled ones")
    ap.add_argument("--profile-rounds", type=int, default=2, help="rounds run under cProfile")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "phase_profile"))
    args = ap.parse_args(argv)

    from machine import describe, require_prepared

    require_prepared(ROOT)
    import torch

    from stages.io import write_json, write_text
    from stages.loop.resume import round_prompts
    from stages.loop.steps import advantage_round, sample_round, score_round, sync_sampler, update_round
    from stages.loop.warm import load_warm
    from stages.params import load_params
    from stages.runtime import configure_env

    params = load_params(args.params)
    configure_env(params.base.threads)
    t = time.perf_counter()
    w = load_warm(params, args.rounds + args.profile_rounds)
    warm_s = time.perf_counter() - t
    sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)

    def one(r: int) -> dict:
        ph, t0 = {}, time.perf_counter()
        prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed)
        samples, _ = sample_round(w, r, prompts)
        sync()
        ph["sample_s"], t1 = time.perf_counter() - t0, time.perf_counter()
        scores, _ = score_round(w, samples)
        sync()
        ph["score_s"], t1 = time.perf_counter() - t1, time.perf_counter()
        advs, w.adv_state, _ = advantage_round(w, scores)
        ph["advantage_s"], t1 = time.perf_counter() - t1, time.perf_counter()
        update_round(w, samples, advs)
        sync_sampler(w)  # the push, timed with the update (else the next round's sampling makes it)
        sync()
        ph["update_s"] = time.perf_counter() - t1
        ph["round_s"] = time.perf_counter() - t0
        ph["tokens"] = int(samples["num_tokens"].sum())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in ph.items()), flush=True)
        return ph

    rounds = []
    try:
        rounds += [one(r) | {"profiled": False} for r in range(args.rounds)]
        prof = cProfile.Profile()
        prof.enable()
        rounds += [one(r) | {"profiled": True} for r in range(args.rounds, args.rounds + args.profile_rounds)]
        prof.disable()
    finally:
        w.sampler.close()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if w.device.type == "cuda" else None
    write_text(text.getvalue(), out.with_name(out.name + ".prof.txt"))
    write_json({"date": time.strftime("%Y-%m-%d"), "machine": describe(), "params": args.params, "warm_s": warm_s,
                "rounds": rounds, "peak_gpu_gib": peak}, out.with_name(out.name + ".json"))
    print(f"warm-up {warm_s:.1f} s; peak GPU memory {peak:.2f} GiB" if peak is not None else f"warm-up {warm_s:.1f} s")


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
