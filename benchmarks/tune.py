"""Choosing the main job's defaults: a grid of settings, each trained from the base model in one warm process, each
evaluated on the whole held-out set with the evaluate stage's metrics (win-rate and reward gain with their 95 %
paired-bootstrap intervals, KL, distinct-2 against the reference's, length).

    python benchmarks/tune.py --rounds 20 --grid update.learning_rate=1e-5,2e-5 score.beta=0.02,0.05 [--eval-every 5]
    python benchmarks/tune.py --rounds 16 --grid update.learning_rate=1e-5 score.beta=0.05 + update.learning_rate=2e-5 score.beta=0.1

Every setting of the grid starts from the base weights with a fresh optimizer (the engine gets the base weights
pushed in, no restart), runs `--rounds` rounds of the loop's own steps with params.yaml plus the setting, and is
evaluated every `--eval-every` rounds and at the end. Finished settings are appended to the results file and skipped
when the command runs again (a long grid that dies continues). Writes benchmarks/results/tune.parquet (one row per
setting and evaluation) and tune.md (the table the README quotes). Needs `dvc repro prepare`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"


def parse_grid(items: list[str]) -> list[dict]:
    """["a.b=1,2", "c.d=x"] -> every combination as {"a.b": 1, "c.d": "x"} (values parsed as YAML scalars); a "+"
    item starts another grid, whose combinations are added: ["a.b=1,2", "+", "a.b=3", "c.d=y"]."""
    groups, settings = [[]], []
    for item in items:
        if item == "+":
            groups.append([])
        else:
            key, _, values = item.partition("=")
            groups[-1].append([(key, yaml_scalar(v)) for v in values.split(",")])
    for axes in groups:
        settings += [dict(combo) for combo in itertools.product(*axes) if dict(combo) not in settings]
    return settings


def setting_key(params, rounds: int, eval_every: int) -> str:
    """A setting's identity: the run identity of the params it trains with (params.yaml plus the setting, so comments,
    output paths or speed knobs do not count), the evaluation settings, the rounds and the evaluation schedule."""
    parts = [params.identity(), params.hash("evaluate"), rounds, eval_every]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:10]


def yaml_scalar(text: str):
    """A YAML scalar, with `1e-5` read as the number (YAML 1.1 wants `1.0e-5`): a `-S` value as the benchmarks read it
    (also benchmarks/first_update.py). A value that is not YAML raises yaml.YAMLError."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def run_setting(w, base_sd: dict, params, rounds: int, eval_every: int, bar) -> list[dict]:
    from sweep_baselines import reset

    from stages.loop import steps
    from stages.loop.resume import round_prompts

    reset(w, params, rounds, base_sd)  # base weights, a new optimizer, the engine back on the base weights
    rows, seen, t0 = [], [], time.perf_counter()
    for r in range(rounds):
        prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed, seen)
        seen.append(prompts["prompt_id"].to_list())
        samples, _ = steps.sample_round(w, r, prompts)
        scores, sc = steps.score_round(w, samples)
        advs, w.adv_state, _ = steps.advantage_round(w, scores)
        steps.update_round(w, samples, advs)
        bar.update(1)
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            from stages.evaluate import flat_metrics

            ev = flat_metrics(steps.evaluate_round(w, r + 1))
            rows.append({"round": r + 1, "train_reward": sc["reward"], "train_kl": sc["kl"],
                         "seconds": time.perf_counter() - t0, **ev})
            bar.set_postfix_str(f"round {r + 1}: win-rate {ev['win_rate']:.2f}, KL {ev['kl']:.2f}")
    return rows


def _num(v, fmt: str) -> str:
    """A metric that may be undefined (null: e.g. distinct-2's ratio against no reference bigram) as text."""
    return "n/a" if v is None else format(v, fmt)


def markdown(df, meta: dict) -> str:
    import polars as pl

    last = df.sort("round").group_by("setting", maintain_order=True).last()
    lines = [f"{meta['date']}, {meta['machine']}; params.yaml plus each setting, {meta['rounds']} rounds, evaluated on "
             f"{int(last['prompts'][0])} held-out prompts (greedy) after the last round.", "",
             "| setting | win-rate [95 % CI] | reward gain [95 % CI] | KL | distinct-2 / reference's | length | "
             "train reward (last) |", "|---|---|---|---|---|---|---|"]
    for r in last.iter_rows(named=True):
        lines.append(f"| {r['setting']} | {r['win_rate']:.3f} [{r['win_rate_ci95_low']:.3f}, {r['win_rate_ci95_high']:.3f}] "
                     f"| {r['reward_gain']:+.3f} [{r['reward_gain_ci95_low']:+.3f}, {r['reward_gain_ci95_high']:+.3f}] "
                     f"| {r['kl']:.2f} | {_num(r['distinct_2_ratio'], '.2f')} | {r['mean_length']:.1f} "
                     f"| {r['train_reward']:.3f} |")
    rounds = sorted(set(df["round"].to_list()))
    lines += ["", "Held-out win-rate [95 % CI] and KL after each evaluated round:", "",
              "| setting | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---|" + "---|" * len(rounds)]
    for name in last["setting"].to_list():
        by = {r["round"]: r for r in df.filter(pl.col("setting") == name).iter_rows(named=True)}
        lines.append(f"| {name} | " + " | ".join(
            f"{by[r]['win_rate']:.2f} [{by[r]['win_rate_ci95_low']:.2f}, {by[r]['win_rate_ci95_high']:.2f}], KL {by[r]['kl']:.1f}"
            if r in by else "-" for r in rounds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--grid", nargs="*", default=[], help="section.field=v1,v2 ... (every combination runs; '+' starts another grid)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    os.chdir(ROOT)

    import polars as pl
    from machine import describe
    from tqdm.auto import tqdm

    from stages.io import read_table, write_table, write_text
    from stages.loop.warm import load_warm
    from stages.params import load_params

    settings = parse_grid(args.grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "tune.parquet"
    df = read_table(table) if table.exists() else None
    overrides = lambda s: {"train.rounds": args.rounds, "train.eval_prompts": 0, **s}  # noqa: E731
    key = lambda s: setting_key(load_params(args.params, overrides(s)), args.rounds, args.eval_every)  # noqa: E731
    done = set(df["key"].to_list()) if df is not None else set()
    todo = [s for s in settings if key(s) not in done]
    print(f"{len(settings)} setting(s), {len(todo)} to run, {args.rounds} rounds each", flush=True)
    if todo:
        base = load_params(args.params, overrides({}))
        w = load_warm(base, args.rounds, with_eval=True)
        base_sd = {k: v.clone() for k, v in w.trainer.state_dict_for_sampler().items()}
        bar = tqdm(total=len(todo) * args.rounds, desc="tune", unit="round", dynamic_ncols=True)
        try:
            for s in todo:
                params = load_params(args.params, overrides(s))
                name = " ".join(f"{k.split('.')[-1]}={v}" for k, v in s.items()) or "params.yaml"
                rows = [{"setting": name, "key": key(s), **r} for r in run_setting(w, base_sd, params, args.rounds,
                                                                                  args.eval_every, bar)]
                new = pl.DataFrame(rows, infer_schema_length=None)
                df = new if df is None else pl.concat([df, new], how="diagonal_relaxed")
                write_table(df, table)  # atomic: a finished setting is never lost
        finally:
            bar.close()
            w.sampler.close()
    keys = {key(s) for s in settings}
    md = markdown(df.filter(pl.col("key").is_in(keys)), {"date": time.strftime("%Y-%m-%d"), "machine": describe(),
                                                         "rounds": args.rounds})
    write_text(md, out / "tune.md")
    print(md)


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
