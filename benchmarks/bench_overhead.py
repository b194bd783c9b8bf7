"""Pipeline overhead: the Prefect flow (tasks + Parquet artifacts + MLflow + checkpoints) vs the bare stage
functions called in a loop, same warm resources, same rounds.

Arms (each in its own subprocess, run in turn; `--repeats` alternates them):
- `bare`: `stages.loop.warm.load_warm` then, per round, `sample_round -> score_round -> advantage_round ->
  update_round` (the functions the flow's tasks wrap): no Prefect, no files, no MLflow, no checkpoint.
- `flow`: `flows.train.train_flow` as `dvc repro` runs it, params.yaml's `update.save_every` (a checkpoint every
  4 rounds and at the end; a crash after round r replays the updates since the checkpoint), written in a
  background thread while the next round samples (`train.async_checkpoint: true`).
- `flow-every-round`: the same with a checkpoint every round (`update.save_every: 1`).
- `flow-sync-ckpt`: every round, with `train.async_checkpoint: false` (the checkpoint written in line).
- `flow-final-ckpt`: the flow with `update.save_every` = rounds (one checkpoint, at the end).

Per round: wall time of the loop over the rounds divided by the rounds (the flow's `rounds_wall_s`: its
Prefect task calls, Parquet writes, manifests, MLflow logging and checkpoints all count, the wait for the last
checkpoint included; the warm-up and the MLflow run's start do not, nor do they for `bare`), and the
checkpoint's own time from the manifests. The wait for the run's last checkpoint (the trained policy and its
optimizer state, ~1.6 GB of the default) is once per run, like the warm-up, and no round overlaps it; so the table
also gives the flow's rounds without it (`rounds_wall_s - last_write_wait_s`), whose overhead is the one that more
rounds do not thin out. The flow arms run from their temp dir (metrics/train.json of the
repo is not touched).

    python benchmarks/bench_overhead.py [--rounds 8] [--repeats 1] [--arms bare flow ...]

Writes benchmarks/results/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ["bare", "flow", "flow-every-round", "flow-sync-ckpt", "flow-final-ckpt"]


def run_bare(args) -> dict:
    os.chdir(ROOT)
    from stages.loop.resume import round_prompts
    from stages.loop.steps import advantage_round, sample_round, score_round, update_round
    from stages.loop.warm import load_warm
    from stages.params import load_params
    from stages.runtime import configure_env

    params = load_params(args.params)
    configure_env(params.base.threads)
    t0 = time.perf_counter()
    w = load_warm(params, args.rounds)
    warm = time.perf_counter() - t0
    rounds = []
    t1 = time.perf_counter()
    try:
        for r in range(args.rounds):
            tr = time.perf_counter()
            prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed)
            samples, s = sample_round(w, r, prompts)
            scores, sc = score_round(w, samples)
            advs, w.adv_state, _ = advantage_round(w, scores)
            u = update_round(w, samples, advs)
            rounds.append(_round_record(time.perf_counter() - tr, {**s, **sc, **u}))
        round_wall = (time.perf_counter() - t1) / args.rounds
    finally:
        w.sampler.close()
    return {"warm_s": warm, "round_wall_s": round_wall, "rounds": rounds}


def run_flow(args, work: Path, save_every: int | None, async_checkpoint: bool = True) -> dict:
    from machine import flow_workdir

    from flows.api import prefect_api, start_server
    from flows.train import train_flow

    params = str(Path(ROOT / args.params).resolve())
    flow_workdir(ROOT, work)
    overrides = {"train.rounds_dir": str(work / "rounds"), "train.checkpoint_dir": str(work / "policy"),
                 "train.state_dir": str(work / "state"), "train.archive_dir": str(work / "archive"),
                 "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "train.eval_every": 0,
                 "train.async_checkpoint": async_checkpoint} | ({"update.save_every": save_every} if save_every else {})
    server = start_server()
    with prefect_api(started=server):  # the temporary server `python -m flows.train` (what `dvc repro` runs) starts
        cpu0 = _cpu_s(server[0].pid) if server else 0.0
        summary = train_flow(params_path=params, rounds=args.rounds, overrides=overrides)
        server_cpu = _cpu_s(server[0].pid) - cpu0 if server else 0.0
    rounds = []
    for r in range(args.rounds):
        man = json.loads((work / "rounds" / f"round={r:04d}" / "manifest.json").read_text())
        m = man["metrics"]
        rounds.append(_round_record(m["time/round_s"], m) | {
            "checkpoint_s": man.get("checkpoint_s", 0.0), "checkpoint_cpu_s": man.get("checkpoint_cpu_s", 0.0),
            "checkpoint_wait_s": m.get("time/checkpoint_wait_s", 0.0)})
    return {"warm_s": summary["warm_start_s"], "round_wall_s": summary["rounds_wall_s"] / args.rounds, "rounds": rounds,
            "server_cpu_s": server_cpu / args.rounds, "last_write_wait_s": summary["last_write_wait_s"]}


def _round_record(round_s: float, stats: dict) -> dict:
    """A round's wall time split into its phases (as the flow's metrics time them) and the rest: task calls, Parquet
    writes, the advantages, conversions."""
    rec = {"round_s": round_s, "sample_s": stats["time/sample_s"],
           "score_s": stats["time/logprobs_s"] + stats["time/reward_s"],
           "update_s": stats["time/update_s"] + stats.get("time/weight_sync_s", 0.0), "reward": stats["reward"]}
    return rec | {"rest_s": round_s - rec["sample_s"] - rec["score_s"] - rec["update_s"]}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0 where it is gone)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def summarize(runs: list[dict], arms: list[str], rounds: int) -> dict:
    """Each arm's means over its repeats (the per-round figures over all its rounds), with its overhead against
    `bare` where that arm ran: per round, and per round less the wait for the run's last checkpoint."""
    per_arm = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        xs = [x for r in rs for x in r["rounds"]]
        a = per_arm[arm] = {
            "round_wall_s": sum(r["round_wall_s"] for r in rs) / len(rs),
            **{k: sum(x.get(k, 0.0) for x in xs) / len(xs) for k in
               ("round_s", "sample_s", "score_s", "update_s", "rest_s", "checkpoint_s", "checkpoint_cpu_s",
                "checkpoint_wait_s")},
            "server_cpu_s": sum(r.get("server_cpu_s", 0.0) for r in rs) / len(rs),
            "last_write_wait_s": sum(r.get("last_write_wait_s", 0.0) for r in rs) / len(rs),
            "warm_s": sum(r["warm_s"] for r in rs) / len(rs),
            "rewards": [x["reward"] for x in rs[0]["rounds"]],
        }
        a["round_wall_less_last_s"] = a["round_wall_s"] - a["last_write_wait_s"] / rounds
    bare = per_arm.get("bare")
    for arm, a in per_arm.items():
        a["overhead_pct"], a["overhead_less_last_pct"] = (
            100 * (a[k] / bare["round_wall_s"] - 1) if bare and arm != "bare" else None
            for k in ("round_wall_s", "round_wall_less_last_s"))
    return per_arm


def render(meta: dict, per_arm: dict, params: str) -> str:
    """overhead.md: one row per arm (`summarize`)."""
    from machine import stamp

    pct = lambda v: f"{v:+.1f} %" if v is not None else "-"  # noqa: E731
    lines = [f"{stamp(meta)}; {meta['rounds']} rounds x {meta['repeats']} repeat(s), {params}. "
             "Seconds per round (mean).", "",
             "| arm | per round (wall) | overhead vs bare | per round less the run's last checkpoint | overhead vs bare "
             "| sampling | scoring | update + sync | rest of the round | after the rounds | checkpoint write (wall / CPU) | "
             "update waited for it | Prefect server CPU | warm-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in per_arm.items():
        lines.append(f"| {arm} | {a['round_wall_s']:.2f} | {pct(a['overhead_pct'])} | {a['round_wall_less_last_s']:.2f} "
                     f"| {pct(a['overhead_less_last_pct'])} | {a['sample_s']:.2f} | {a['score_s']:.2f} | "
                     f"{a['update_s']:.2f} | {a['rest_s']:.2f} | {a['round_wall_s'] - a['round_s']:.2f} | "
                     f"{a['checkpoint_s']:.2f} / {a['checkpoint_cpu_s']:.2f} | {a['checkpoint_wait_s']:.2f} | "
                     f"{a['server_cpu_s']:.2f} | {a['warm_s']:.1f} |")
    lines += ["", "Per round: the phases as the flow's metrics time them (`time/sample_s`; `time/logprobs_s` + "
              "`time/reward_s`; `time/update_s` + `time/weight_sync_s`); the rest of the round (task calls, Parquet "
              "writes, the advantages); after the rounds: the wall time per round outside the rounds (MLflow and "
              "Prefect logging between rounds, the wait for the run's last checkpoint, which the fourth column leaves "
              "out: once per run, like the warm-up); the checkpoint's wall and CPU seconds in its writer thread; the "
              "Prefect server's CPU seconds during the flow (warm-up included), per round."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        work = Path(args.work)
        if args.worker == "bare":
            res = run_bare(args)
        else:
            save_every = {"flow": None, "flow-final-ckpt": args.rounds}.get(args.worker, 1)
            res = run_flow(args, work, save_every, args.worker != "flow-sync-ckpt")
        (work / "result.json").write_text(json.dumps(res, indent=1))
        return

    from machine import alternate_arms, code_version, describe, params_name, require_prepared
    from stages.errors import PipelineError
    from stages.io import write_json, write_text

    require_prepared(ROOT)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for rep, arm, work, rc in alternate_arms(tmp, args.arms, args.repeats, __file__,
                                                 ["--rounds", str(args.rounds), "--params", args.params], f"{args.rounds} rounds"):
            if rc:
                raise PipelineError(f"bench_overhead: the {arm} arm failed (its output is above)")
            res = json.loads((work / "result.json").read_text())
            runs.append({"arm": arm, "repeat": rep, **res})
            print(f"    {arm}: {res['round_wall_s']:.2f} s per round (warm-up {res['warm_s']:.1f} s)", flush=True)
    per_arm = summarize(runs, args.arms, args.rounds)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": describe(), "code": code_version(),
            "rounds": args.rounds, "repeats": args.repeats, "params": args.params}
    md = render(meta, per_arm, params_name(args.params))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"meta": meta, "arms": per_arm, "runs": runs}, out / "overhead.json")
    write_text(md, out / "overhead.md")
    print(md)


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
