"""What a round leaves on disk, and the run's summary (docs/design.md §6).

Per round, in `train.rounds_dir/round=NNNN/`: `samples.parquet`, `scores.parquet`, `advantages.parquet` (each
written atomically as soon as it exists), then the checkpoint when due, then `manifest.json`, the mark of a complete
round: identity, params hash, row counts, each artifact's size and SHA-256, metrics, the carried baseline state,
the MLflow run id. The checkpoint and the manifest are written by `RoundWriter`, in a background thread that
overlaps the next round's sampling and scoring (`train.async_checkpoint`).

Per run: `metrics/train.json` (the last round and run facts, what `dvc metrics show` reads) and
`plots/train.csv` (one row per round, what `dvc plots show` draws).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from stages.loop.resume import file_record, write_manifest

METRICS_FILE = "metrics/train.json"
PLOTS_FILE = "plots/train.csv"


def write_artifact(df: pl.DataFrame, d: Path, name: str, schema) -> dict:
    """Write one round artifact atomically; its manifest record (bytes, sha256, rows)."""
    from stages.io import write_table

    path = write_table(df, d / f"{name}.parquet", schema)
    return file_record(path, df.height)


def manifest_for(r: int, identity: str, params_hash: str, artifacts: dict, metrics: dict, adv_state: dict,
                 mlflow_run_id: str | None, extra: dict | None = None) -> dict:
    return {
        "round": r,
        "identity": identity,
        "params_hash": params_hash,
        "policy_version": r,
        "rows": {name.removesuffix(".parquet"): rec["rows"] for name, rec in artifacts.items()},
        "artifacts": artifacts,
        "metrics": metrics,
        "advantage_state": adv_state,
        "mlflow_run_id": mlflow_run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }


def round_write(trainer, params, manifest: dict, manifest_path: Path, save: bool, gathered: dict | None = None
                ) -> Callable[[], None]:
    """The write that closes round r: its checkpoint (when due), then its manifest. The RNG state is taken now, in
    the caller's thread; the weights and optimizer state are read in the writer's thread, which is safe because the
    flow waits for it before the next update changes them (a sharded trainer's state comes `gathered` instead)."""
    from stages import checkpoint

    rng = trainer.rng_state()
    tp = params.train

    def write() -> None:
        m = dict(manifest, checkpoint=save)
        if save:
            tc, cpu = time.perf_counter(), time.thread_time()
            checkpoint.save(trainer, tp.checkpoint_dir, tp.state_dir,
                            {"identity": manifest["identity"], "manifest": m}, rng=rng, gathered=gathered)
            m["checkpoint_s"], m["checkpoint_cpu_s"] = time.perf_counter() - tc, time.thread_time() - cpu
        write_manifest(m, manifest_path)

    return write


def _lower_priority() -> None:
    """The writer thread yields the cores to sampling and scoring (Linux: per-thread nice)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class RoundWriter:
    """Writes a round's checkpoint and then its manifest, in one background thread, one round at a time.

    The write overlaps the next round's sampling and scoring: they only read the policy, and the flow calls
    `wait()` before the next update changes the weights and optimizer state, so the checkpoint is the exact
    state after round r without a copy of it. The manifest (the mark of a complete round) is written after
    the checkpoint: a crash during the write leaves round r incomplete, and a resume re-runs it.
    A failed write is raised by the next `wait()`. With `enabled=False` the write happens in the caller.
    """

    def __init__(self, enabled: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="round-writer", initializer=_lower_priority) if enabled else None
        self.pending = None
        self.inline_s = 0.0  # the last write made in the caller (enabled=False): all of it was waited for

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        if self.pool is None:
            t0 = time.perf_counter()
            fn()
            self.inline_s = time.perf_counter() - t0
        else:
            self.pending = self.pool.submit(fn)

    def wait(self) -> float:
        """Block until the pending write is on disk; the seconds spent waiting."""
        t0 = time.perf_counter()
        if self.pending is not None:
            fut, self.pending = self.pending, None
            fut.result()
        return time.perf_counter() - t0

    def close(self) -> float:
        """Wait for the pending write and stop the thread; the seconds the caller waited for the last write (with
        `enabled=False`, that write's own seconds: it was made in the caller)."""
        try:
            return self.wait() if self.pool is not None else self.inline_s
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


SUMMARY_KEYS = ["reward", "reward_std", "kl", "rlhf_reward", "loss", "entropy", "advantage_std", "completions/mean_length"]
PLOT_COLUMNS = ["reward", "reward_std", "kl", "rlhf_reward", "loss", "entropy", "advantage_std",
                "completions/mean_length", "time/round_s", "eval/reward", "eval/reward_gain", "eval/reward_gain_ci95_low",
                "eval/reward_gain_ci95_high", "eval/win_rate", "eval/win_rate_ci95_low", "eval/win_rate_ci95_high",
                "eval/kl", "eval/distinct_2", "grad/variance", "grad/snr"]


def write_run_outputs(history: list[dict], total: int, identity: str, warm_s: float, wall_s: float, rounds_run: int,
                      rounds_wall_s: float, mlflow_run_id: str | None = None, last_write_wait_s: float = 0.0) -> dict:
    """metrics/train.json (last round + run facts) and plots/train.csv (one row per round).

    `seconds_per_round` is the rounds' own time; `wall_s` is this invocation from the start of the warm-up;
    `rounds_wall_s` is the loop over the rounds with their checkpoints, Parquet, MLflow and Prefect, and the wait
    for the last checkpoint (not the warm-up, nor the MLflow run's start); `last_write_wait_s` is that wait alone, the
    run's last checkpoint, which no round overlaps (its share of `rounds_wall_s` shrinks as rounds are added)."""
    from stages.io import atomic_path, write_json

    last = history[-1] if history else {}
    summary = {k: last[k] for k in SUMMARY_KEYS if k in last}
    summary |= {"rounds": total, "identity": identity, "mlflow_run_id": mlflow_run_id,
                "seconds_per_round": sum(h["time/round_s"] for h in history) / max(len(history), 1),
                "warm_start_s": warm_s, "wall_s": wall_s, "rounds_run": rounds_run, "rounds_wall_s": rounds_wall_s,
                "last_write_wait_s": last_write_wait_s}
    gv = [h for h in history if h.get("grad/variance") is not None]
    if gv:  # update.grad_variance: the run's means, so `dvc exp show` compares estimators on them
        var = sum(h["grad/variance"] for h in gv) / len(gv)
        summary |= {"grad_variance_mean": var,
                    "grad_snr": sum(h["grad/signal"] for h in gv) / len(gv) / var if var > 0 else None}
    rows = [{"round": i + 1, **{c.replace("/", "_"): h.get(c) for c in PLOT_COLUMNS}} for i, h in enumerate(history)]
    with atomic_path(PLOTS_FILE, ".csv") as tmp:
        pl.DataFrame(rows, infer_schema_length=None).write_csv(tmp)
    write_json(summary, METRICS_FILE)  # last: a run whose metrics file is current has its plots written too
    return summary
