"""RLOO against the classic REINFORCE baselines (Ahmadian et al. 2024, section 5): same task, same budget, seeds.

Every (estimator, seed) run starts from the base model and trains `--rounds` rounds of the default task
(params.yaml: prompts_per_round prompts x K completions, VADER + length reward, KL penalty, AdamW), changing
only `advantage.estimator` and `base.seed`. After each round the policy is evaluated greedily on the held-out
prompts (the evaluate stage's reward and win-rate against the base model; round 0 is the base model itself).

Gradient variance: with `update.grad_variance` each prompt's K completions form one micro-batch, and the
trainer measures the trace of the covariance of the one-prompt gradient estimate across the round's prompts,
before clipping (see stages/update.py `_GradVariance`). Prompts are the independent unit (the leave-one-out
baseline couples the completions of one prompt), and the trace is the quantity SGD bounds depend on. As the
estimators scale advantages differently (GRPO divides by the group std, RLOO multiplies by K/(K-1)) and Adam is
nearly invariant to the gradient's scale, the table also gives two scale-free forms: the variance divided by
the variance of the round's advantages (rescaling the advantages by c rescales both by c^2; what is left is how
much noise the baseline lets through per unit of advantage spread), and the signal-to-noise ratio
||E g||^2 / var (||E g||^2 estimated without bias as ||G||^2 - var * sum_p w_p^2, var/M for M equally weighted prompts; ratio of the means
over rounds and seeds, since one round's estimate is noisy; the table counts the rounds where the estimate came
out negative, i.e. the signal was below the noise floor of one round's M prompts).

One process, one warm vLLM engine, reference and reward models for the whole sweep: a run resets the trainer
to the base weights and pushes them into the running engine (no restart). Each finished run is appended to
the results file atomically, and a re-run skips the runs already there (same config), so an interrupted sweep
resumes. The same sweep as a DVC experiment queue is in the README (`dvc exp run --queue -S ...`).

    python benchmarks/sweep_baselines.py [--rounds 3] [--seeds 1 2 3] [--estimators rloo reinforce ...]

Needs `dvc repro prepare` (models/base, data/prepared). Writes benchmarks/results/baselines.parquet (one row
per run and round), baselines.md (the table) and baselines.png (the plot).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from stages.estimators import ESTIMATORS as _TABLE  # noqa: E402
from stages.loop.resume import round_prompts  # noqa: E402
from stages.loop.steps import advantage_round, sample_round, score_round, sync_sampler, update_round  # noqa: E402
from stages.loop.warm import load_warm  # noqa: E402

# the article's set first (RLOO against the classic baselines), then the rest of the table
ESTIMATORS = ["rloo", "reinforce", "moving_average", "ema"] + [e for e in _TABLE if e not in ("rloo", "reinforce", "moving_average", "ema")]
RESULTS = ROOT / "benchmarks" / "results"


def run_key(params, rounds: int) -> str:
    """Identifies the sweep's budget: a results row from another config is not reused."""
    d = params.model_dump()
    # not the budget: what varies across the sweep, and what only concerns the flow's files and checkpoints
    for sec, keys in (("base", ["seed"]), ("advantage", ["estimator"]),
                      ("train", ["rounds", "eval_every", "rounds_dir", "checkpoint_dir", "async_checkpoint"])):
        for k in keys:
            d[sec].pop(k, None)
    d.pop("mlflow", None)
    return hashlib.sha1(json.dumps([d, rounds], sort_keys=True, default=str).encode()).hexdigest()[:10]


def reset(w, params, rounds: int, base_sd: dict):
    """A fresh trainer (base weights, new AdamW) and the base weights pushed into the warm engine."""
    import torch

    from stages.models import same_weights
    from stages.update import Trainer

    w.trainer = None
    gc.collect()
    torch.manual_seed(params.base.seed)
    w.trainer = Trainer(params.base.model_dir, params, w.device, total_rounds=rounds)
    w.params, w.adv_state = params, None
    w.sampler.update_weights(state_dict=base_sd)
    w.sampler_behind = False  # the engine has the new trainer's weights: the base's
    w.policy_is_ref = same_weights(w.trainer.model, w.ref)  # round 1 without a reference pass, as in the flow


def evaluate(w, version: int) -> dict:
    """The evaluate stage's metrics on the held-out prompts (train.eval_prompts of them), against the base model."""
    from stages.evaluate import flat_metrics
    from stages.loop.steps import evaluate_round

    m = flat_metrics(evaluate_round(w, version))
    return {"eval_reward": m["reward"], "eval_win_rate": m["win_rate"], "eval_mean_length": m["mean_length"],
            "eval_kl": m["kl"], "eval_distinct_2": m["distinct_2"], "eval_win_rate_low": m["win_rate_ci95_low"],
            "eval_win_rate_high": m["win_rate_ci95_high"]}


def one_run(w, params, rounds: int, base_sd: dict, base_eval: dict, key: str, bar, eval_every: int = 1) -> list[dict]:
    reset(w, params, rounds, base_sd)
    est, seed = params.advantage.estimator, params.base.seed
    rows = [{"estimator": est, "seed": seed, "round": 0, **base_eval}]
    for r in range(rounds):
        t0 = time.perf_counter()
        prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, seed)
        samples, s_stats = sample_round(w, r, prompts)
        scores, sc_stats = score_round(w, samples)
        advs, w.adv_state, a_stats = advantage_round(w, scores)
        u = update_round(w, samples, advs)
        sync_sampler(w)  # the push, in the round's time (else the evaluation or the next round's sampling makes it)
        seconds = time.perf_counter() - t0
        ev = evaluate(w, r + 1) if (r + 1) % eval_every == 0 or r + 1 == rounds else {}
        rows.append({
            "estimator": est, "seed": seed, "round": r + 1, **ev,
            "train_reward": sc_stats["reward"], "kl": sc_stats["kl"], "advantage_std": a_stats["advantage_std"],
            "grad_norm": u["grad_norm"], "grad_variance": u.get("grad/variance"),
            "grad_signal": u.get("grad/signal"), "grad_snr": u.get("grad/snr"), "grad_mean_sq_norm": u.get("grad/mean_sq_norm"),
            "round_s": seconds,
        })
        gv = rows[-1]["grad_variance"]
        held = f"held-out {ev['eval_reward']:.3f}, " if ev else ""
        bar.set_postfix_str(f"{est} seed {seed} round {r + 1}: {held}grad var " + ("n/a" if gv is None else f"{gv:.3g}"))
        bar.update(1)
    return [{**row, "config": key} for row in rows]


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t, 97.5 %


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % t-interval of the mean over seeds."""
    import math
    import statistics

    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return m, float("nan"), float("nan")
    half = T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return m, m - half, m + half


def summarize(df: pl.DataFrame, rounds: int) -> pl.DataFrame:
    """Per estimator: final held-out reward and win-rate (mean and 95 % t-interval over seeds), the difference from
    RLOO paired by seed (the same seed sees the same first-round completions) with its interval, the rounds to reach
    a target held-out reward (half-way from the base model to the best final mean), the gradient variance (mean over
    rounds and seeds), training reward and KL at the last round."""
    last = df.filter(pl.col("round") == rounds)
    trained = df.filter(pl.col("round") > 0).with_columns(
        (pl.col("grad_variance") / pl.col("advantage_std") ** 2).alias("grad_var_per_adv_var"))
    base = float(df.filter(pl.col("round") == 0)["eval_reward"].mean())
    best = float(last.group_by("estimator").agg(pl.col("eval_reward").mean())["eval_reward"].max())
    target = base + 0.5 * (best - base)
    rloo = dict(last.filter(pl.col("estimator") == "rloo").select("seed", "eval_reward").iter_rows())
    rows = []
    for est, g in last.group_by("estimator", maintain_order=True):
        est = est[0]
        m, lo, hi = t_interval(g["eval_reward"].to_list())
        wm, wlo, whi = t_interval(g["eval_win_rate"].to_list())
        diffs = [r - rloo[sd] for sd, r in g.select("seed", "eval_reward").iter_rows() if sd in rloo]
        dm, dlo, dhi = t_interval(diffs) if est != "rloo" and len(diffs) > 1 else (float("nan"),) * 3
        reach = []
        for _, run in df.filter((pl.col("estimator") == est) & pl.col("eval_reward").is_not_null()).group_by("seed"):
            hit = run.filter((pl.col("round") > 0) & (pl.col("eval_reward") >= target)).sort("round")
            reach.append(hit["round"][0] if hit.height else None)
        reached = [x for x in reach if x is not None]
        rows.append({"estimator": est, "seeds": g["seed"].n_unique(), "reward_mean": m, "reward_low": lo,
                     "reward_high": hi, "win_rate_mean": wm, "win_rate_low": wlo, "win_rate_high": whi,
                     "vs_rloo": dm, "vs_rloo_low": dlo, "vs_rloo_high": dhi, "target": target,
                     "rounds_to_target": (sum(reached) / len(reached)) if reached else None,
                     "reached": f"{len(reached)}/{len(reach)}", "kl_last": float(g["kl"].mean())})
    a = pl.DataFrame(rows, infer_schema_length=None)
    b = trained.group_by("estimator").agg(
        pl.col("grad_variance").mean().alias("grad_var_mean"),
        pl.col("grad_variance").std().alias("grad_var_std"),
        pl.col("grad_var_per_adv_var").mean().alias("norm_var_mean"),
        pl.col("grad_var_per_adv_var").std().alias("norm_var_std"),
        (pl.col("grad_signal") < 0).mean().alias("signal_negative"),
        (pl.col("grad_signal").mean() / pl.col("grad_variance").mean()).alias("snr"),
        pl.col("grad_mean_sq_norm").mean().alias("grad_sq_norm_mean"),
        pl.col("advantage_std").mean().alias("advantage_std"),
        pl.col("train_reward").mean().alias("train_reward_mean"),
    )
    order = {e: i for i, e in enumerate(ESTIMATORS)}
    out = a.join(b, on="estimator").with_columns(pl.col("estimator").replace_strict(order, default=99).alias("_o"))
    return out.sort("_o").drop("_o")


def markdown(summary: pl.DataFrame, base_reward: float, meta: dict) -> str:
    f = lambda v, spec=".3f": "–" if v is None or v != v else format(v, spec)  # noqa: E731
    target = summary["target"][0]
    lines = [
        f"Held-out reward after {meta['rounds']} rounds (base model: {base_reward:.3f}): mean and 95 % t-interval over "
        f"{meta['seeds']} seeds; the difference from RLOO paired by seed; rounds to reach a held-out reward of "
        f"{target:.3f} (half-way from the base model to the best final mean); gradient variance over every trained "
        f"round. {meta['machine']}, {meta['date']}.",
        "",
        "| estimator | seeds | held-out reward [95 % CI] | minus RLOO's [95 % CI] | win-rate vs base [95 % CI] | "
        "rounds to target (runs that got there) | train KL (last) | grad variance / Var(A) | grad SNR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.iter_rows(named=True):
        sig = ""
        if r["vs_rloo"] == r["vs_rloo"]:
            sig = " **(significant)**" if r["vs_rloo_low"] > 0 or r["vs_rloo_high"] < 0 else " (not significant)"
        lines.append(
            f"| {r['estimator']} | {r['seeds']} | {f(r['reward_mean'])} [{f(r['reward_low'])}, {f(r['reward_high'])}] | "
            f"{f(r['vs_rloo'], '+.3f')} [{f(r['vs_rloo_low'], '+.3f')}, {f(r['vs_rloo_high'], '+.3f')}]{sig} | "
            f"{f(r['win_rate_mean'])} [{f(r['win_rate_low'])}, {f(r['win_rate_high'])}] | "
            f"{f(r['rounds_to_target'], '.1f')} ({r['reached']}) | {r['kl_last']:.3f} | "
            f"{r['norm_var_mean']:.3g} +- {r['norm_var_std'] or 0:.2g} | {r['snr']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def held_out_curve(df: pl.DataFrame, est: str) -> pl.DataFrame:
    """(round, m, s): the held-out reward's mean over seeds and the half-width of its 95 % t-interval, at the rounds
    that were evaluated (`--eval-every`) only: a round without an evaluation is not a point of the curve."""
    ev = df.filter((pl.col("estimator") == est) & pl.col("eval_reward").is_not_null())
    rows = []
    for (r,), g in ev.group_by("round"):
        m, _, high = t_interval(g["eval_reward"].to_list())
        rows.append({"round": r, "m": m, "s": high - m if high == high else 0.0})  # one seed: no interval
    return pl.DataFrame(rows, schema={"round": pl.Int64, "m": pl.Float64, "s": pl.Float64}).sort("round")


def plot(df: pl.DataFrame, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.4))
    df = df.with_columns((pl.col("grad_variance") / pl.col("advantage_std") ** 2).alias("nvar"))
    for est in [e for e in ESTIMATORS if e in set(df["estimator"])]:
        g = (df.filter(pl.col("estimator") == est).group_by("round")
             .agg(pl.col("grad_variance").mean().alias("v"), pl.col("grad_variance").std().alias("vs"),
                  pl.col("nvar").mean().alias("n"), pl.col("nvar").std().alias("ns"))
             .sort("round").fill_null(0.0))
        ge = held_out_curve(df, est)
        x, m, s = ge["round"].to_numpy(), ge["m"].to_numpy(), ge["s"].to_numpy()
        (line,) = ax1.plot(x, m, marker="o", label=est)
        ax1.fill_between(x, m - s, m + s, alpha=0.15, color=line.get_color())
        gv = g.filter(pl.col("round") > 0)
        ax2.errorbar(gv["round"].to_numpy(), gv["v"].to_numpy(), yerr=gv["vs"].to_numpy(), marker="o", capsize=3,
                     label=est, color=line.get_color())
        ax3.errorbar(gv["round"].to_numpy(), gv["n"].to_numpy(), yerr=gv["ns"].to_numpy(), marker="o", capsize=3,
                     label=est, color=line.get_color())
    ax1.set(xlabel="round", ylabel="held-out reward (greedy)", title="Held-out reward, mean and 95 % CI over seeds")
    ax2.set(xlabel="round", ylabel="trace Cov(one-prompt gradient)", yscale="log",
            title="Variance of the policy-gradient estimate")
    ax3.set(xlabel="round", ylabel="trace Cov / Var(advantage)", yscale="log",
            title="Same, per unit of advantage spread")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend(fontsize=8)
    fig.suptitle(f"RLOO vs REINFORCE baselines: {meta['seeds']} seeds, {meta['rounds']} rounds ({meta['machine']}, {meta['date']})", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_outputs(df: pl.DataFrame, out: Path, meta: dict) -> str:
    from stages.io import write_text

    base_reward = float(df.filter(pl.col("round") == 0)["eval_reward"].mean())
    summary = summarize(df, meta["rounds"])
    md = markdown(summary, base_reward, meta)
    write_text(md, out / "baselines.md")
    plot(df, out / "baselines.png", meta)
    return md


def main(argv: list[str] | None = None) -> None:
    os.chdir(ROOT)  # params.yaml names models/ and data/ relative to the repo root
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=12, help="rounds per run (same budget for every estimator; the main job's 12)")
    ap.add_argument("--eval-every", type=int, default=4, help="held-out evaluation every N rounds (and after the last)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from machine import describe, require_prepared
    from tqdm.auto import tqdm

    from stages.io import read_table, write_table
    from stages.params import load_params

    require_prepared(ROOT, eval_split=True)
    overrides = {"update.grad_variance": True, "train.rounds": args.rounds}
    base_params = load_params(args.params, overrides)
    key = run_key(base_params, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "baselines.parquet"
    stored = read_table(table) if table.exists() else None
    others = None  # rows of other budgets stay in the file
    df = stored
    if stored is not None and "config" in stored.columns:
        df, others = stored.filter(pl.col("config") == key), stored.filter(pl.col("config") != key)
        df = df if df.height else None
    done = set() if df is None else {(e, s) for e, s in df.select("estimator", "seed").unique().iter_rows()
                                     if df.filter((pl.col("estimator") == e) & (pl.col("seed") == s)).height == args.rounds + 1}
    todo = [(e, s) for s in args.seeds for e in args.estimators if (e, s) not in done]
    meta = {"rounds": args.rounds, "seeds": len(args.seeds), "date": time.strftime("%Y-%m-%d"),
            "machine": describe()}
    print(f"{len(args.estimators)} estimators x {len(args.seeds)} seeds x {args.rounds} rounds; "
          f"{len(done)} runs already in {table}, {len(todo)} to run", flush=True)
    if todo:
        t0 = time.perf_counter()
        w = load_warm(base_params, args.rounds, with_eval=True)
        base_sd = {k: v.clone() for k, v in w.trainer.state_dict_for_sampler().items()}
        base_eval = evaluate(w, 0)
        print(f"warm in {time.perf_counter() - t0:.1f} s; base model held-out reward {base_eval['eval_reward']:.3f}", flush=True)
        bar = tqdm(total=len(todo) * args.rounds, desc="sweep", unit="round", dynamic_ncols=True)
        try:
            for est, seed in todo:
                params = load_params(args.params, {**overrides, "advantage.estimator": est, "base.seed": seed})
                rows = pl.DataFrame(one_run(w, params, args.rounds, base_sd, base_eval, key, bar, args.eval_every),
                                    infer_schema_length=None)
                df = rows if df is None else pl.concat([df, rows], how="diagonal_relaxed")
                keep = df if others is None or not others.height else pl.concat([others, df], how="diagonal_relaxed")
                write_table(keep, table)  # atomic; a finished run is never lost, nor another budget's rows
        finally:
            bar.close()
            w.sampler.close()
    df = df.filter(pl.col("estimator").is_in(args.estimators) & pl.col("seed").is_in(args.seeds))
    print(write_outputs(df, out, meta))
    print(f"wrote {table}, {out / 'baselines.md'}, {out / 'baselines.png'}")


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
