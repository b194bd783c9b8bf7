"""MLflow tracking for a training run: one MLflow run per training run, metrics per round (step = round).

Store: `mlflow.tracking_uri` (default `sqlite:///mlflow.db` in the repo); `MLFLOW_TRACKING_URI` overrides.
Params: every field of params.yaml flattened (`update.learning_rate`, ...). Tags: git commit, DVC stage and
experiment name (when run by DVC), Prefect flow-run id, run identity. Metrics: TRL-style names (`reward`,
`reward_std`, `kl`, `advantage_std`, `loss`, `grad_norm`, `entropy`, `completions/mean_length`,
`completions/clipped_ratio`, `time/*_s`, `*/tokens_per_s`). Artifacts: a sample of each round's
completions (`completions/round_NNNN.json`), and at the end the reward-curve plot and the history table.
A resumed run re-opens the same MLflow run (its id is kept in each round's manifest). A run whose process died
without ending its MLflow run (kill -9, a lost machine) left it RUNNING: the next start in the same dir, holding the
run lock, marks it KILLED (`end_dead_runs`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
_run = None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


TOPOLOGY_TAGS = ("world_size", "backend", "strategy")


def _update_resumed(run, latest: dict, params) -> None:
    """A resumed run's tags say the latest invocation: a tag it does not have (no DVC experiment now, one process
    after several) is removed, not left from an earlier one. MLflow params cannot change once logged: a field that
    changed since (the fields outside the run identity, e.g. `train.rounds`) gets the tag `latest.<field>`."""
    import mlflow

    client, run_id, tags = mlflow.MlflowClient(), run.info.run_id, run.data.tags
    # every DVC experiment that ran this run, oldest first (`dvc_experiment` names only the latest: a search for the
    # experiment that started the run found nothing once another continued it)
    exp_name = latest.get("dvc_experiment")
    ran = [e for e in (tags.get("dvc_experiments") or tags.get("dvc_experiment") or "").split(",") if e]
    if exp_name and exp_name not in ran:
        mlflow.set_tag("dvc_experiments", ",".join([*ran, exp_name])[-5000:])
    for key in [k for k, v in latest.items() if not v and k in tags] + [
            k for k in TOPOLOGY_TAGS if k not in latest and k in tags]:
        client.delete_tag(run_id, key)
    logged = run.data.params
    now = {k: str(v)[:500] for k, v in params.flat().items()}
    changed = {f"latest.{k}": v for k, v in now.items() if k in logged and (logged[k] != v or f"latest.{k}" in tags)}
    if changed:
        mlflow.set_tags(changed)


class StoreError(Exception):
    """The tracking store itself did not open (a bad URI, a server that does not answer), as opposed to the
    experiment (e.g. a deleted one of that name)."""


def store_uri(params) -> tuple[str, str]:
    """Where the run's tracking store is: (the setting that names it, its URI). `MLFLOW_TRACKING_URI`, when set,
    wins over `mlflow.tracking_uri`. A relative local store (`sqlite:///mlflow.db`, `mlruns`) in a queued DVC
    experiment is the checkout's: relative to the experiment's temporary copy it would go with the copy."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        setting, uri = "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"]
    else:
        setting, uri = "mlflow.tracking_uri", params.mlflow.tracking_uri
    from stages.errors import queued_checkout

    home = queued_checkout()
    if home is not None:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{home / uri.removeprefix('sqlite:///')}"
        elif uri.startswith("file:") and not uri.startswith("file:/"):
            uri = (home / uri.removeprefix("file:")).as_uri()
        elif "://" not in uri and not uri.startswith("file:") and not Path(uri).is_absolute():
            uri = str(home / uri)
    return setting, uri


def open_store(params) -> None:
    """Open the run's tracking store and experiment (`MLFLOW_TRACKING_URI`, else `mlflow.tracking_uri`), creating
    them on a first run; `StoreError` when the store does not open. MLflow keeps the store for the rest of the
    process, so `start_run` after this one costs little: `python -m flows.train` calls it while its temporary
    Prefect server boots, where a core is idle (docs/design.md §7: 1.4-1.5 s for a new sqlite database on the 2-core
    Xeon with AMX, MLflow's SQL store imported and its schema migrations run)."""
    import mlflow

    _, uri = store_uri(params)
    _reachable(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        exp = mlflow.MlflowClient().get_experiment_by_name(params.mlflow.experiment)  # the store opens (or is made) here
    except Exception as exc:
        raise StoreError(str(exc)) from exc
    from stages.errors import queued_checkout

    home = queued_checkout()
    if exp is None and home is not None and "://" not in uri.removeprefix("sqlite://"):
        # a queued DVC experiment that makes the experiment: a local store's default artifact root (./mlruns) would be
        # in the copy DVC deletes, for this run and every later one of the experiment
        mlflow.create_experiment(params.mlflow.experiment, artifact_location=(home / "mlruns").as_uri())
    mlflow.set_experiment(params.mlflow.experiment)


def _reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server's host and port take a connection, in `timeout_s`; `StoreError` otherwise. MLflow's own
    client retries a refused connection for ~4 minutes (7 retries with backoff) before it fails; a server that
    answers at all gets its retries as it is. Not probed through a proxy (the environment's HTTP(S)_PROXY applies
    to this host): MLflow's requests go through it, and only it can say."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise StoreError(f"bad port in {uri} ({exc})") from None
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise StoreError(f"no connection to {parts.hostname}:{port} in {timeout_s:.0f} s: "
                         f"{type(exc).__name__}: {exc}") from None


def _where(params) -> dict:
    """The tags that say where an MLflow run trains and who logs it: the machine, the rounds dir, the checkout
    (`stages.loop.lock.checkout_id`) and the process (`process_key`)."""
    from stages.loop.lock import checkout_id, process_key

    where = {"host": socket.gethostname(), "rounds_dir": str(Path(params.train.rounds_dir).resolve()),
             "checkout": checkout_id(), "owner": process_key()}
    return {k: v for k, v in where.items() if v}


def end_dead_runs(params, keep: str | None = None, where: dict | None = None, exp=None) -> list[str]:
    """Mark KILLED the MLflow runs of this experiment that a run of this checkout, on this machine and in this rounds
    dir, left RUNNING and whose process is gone, except `keep`: their ids. Called by the start of a training run,
    which holds the checkout's run lock (stages/loop/lock.py), so such a run had its process die without ending it
    (kill -9 before its first round's manifest, whose id a resume would re-open). A run whose logging process is
    still alive (a rank that outlived the lock's holder) is left RUNNING, and so are runs from before these tags and
    those of other checkouts, machines or dirs sharing the store. `where` and `exp`: this start's `_where` and the
    experiment, when the caller has them."""
    import mlflow

    from stages.loop.lock import process_alive

    where = where or _where(params)
    if "checkout" not in where:
        return []
    client = mlflow.MlflowClient()
    exp = exp or client.get_experiment_by_name(params.mlflow.experiment)
    if exp is None:
        return []
    found = client.search_runs([exp.experiment_id], f"attributes.status = 'RUNNING' and tags.checkout = "
                               f"'{where['checkout']}'", max_results=1000)
    dead = [r.info.run_id for r in found
            if r.info.run_id != keep and all(r.data.tags.get(k) == where[k] for k in ("host", "rounds_dir"))
            and not process_alive(r.data.tags.get("owner", ""))]
    for run_id in dead:
        client.set_tag(run_id, "ended_as", "KILLED by a later start in the same dir: its process died without ending it")
        client.set_terminated(run_id, status="KILLED")
        log.warning("MLflow: run %s was left RUNNING by a process that died (kill -9 or a crash); marked it KILLED",
                    run_id)
    return dead


def _unique_name(params, name: str, exp=None) -> str:
    """`name`, or `name-2`, `name-3`, ... where a run of this experiment (`exp`, looked up when not given) has it (a
    `--restart` of the same configuration, whose identity and so name are the archived run's)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = exp or client.get_experiment_by_name(params.mlflow.experiment)
    if exp is None or "'" in name:
        return name
    taken = {r.info.run_name for r in client.search_runs([exp.experiment_id], f"attributes.run_name LIKE '{name}%'",
                                                         max_results=1000)}
    n = 1
    while (candidate := name if n == 1 else f"{name}-{n}") in taken:
        n += 1
    return candidate


def start_run(params, identity: str, resume_id: str | None = None, topology: dict | None = None):
    """Start (or re-open) the MLflow run of this training run; `topology` (world size, backend, strategy) becomes
    tags of the run (rank 0 alone logs). Runs that died here without ending are marked KILLED first
    (`end_dead_runs`)."""
    global _run
    import mlflow

    open_store(params)
    where = _where(params)  # once a start: it reads the checkout id and /proc
    exp = None
    try:  # bookkeeping: it must not stop a run
        exp = mlflow.MlflowClient().get_experiment_by_name(params.mlflow.experiment)
        end_dead_runs(params, keep=resume_id, where=where, exp=exp)
    except Exception as exc:
        log.warning("MLflow: could not look for runs left RUNNING by a dead process (%s)", exc)
    if resume_id:
        try:
            _run = mlflow.start_run(run_id=resume_id)
            # the tags name the latest invocation (its commit, flow run, DVC stage), as on a new run
            # (and not the mark of a dead process's run: this one goes on)
            latest = {"git_commit": _git_commit(), "prefect_flow_run_id": _prefect_flow_run_id(), **where,
                      "ended_as": None,
                      "dvc_stage": os.environ.get("DVC_STAGE"), "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
                      **{k: str(v) for k, v in (topology or {}).items() if v is not None}}
            mlflow.set_tags({k: v for k, v in latest.items() if v})
            try:  # tags are bookkeeping: a failure here must not start a second MLflow run for this one
                _update_resumed(_run, latest, params)
            except Exception as exc:
                log.warning("MLflow: could not update the resumed run's tags (%s)", exc)
            log.info("MLflow: resumed run %s", resume_id)
            return _run
        except Exception as exc:
            log.warning("MLflow: could not resume run %s (%s); starting a new one", resume_id, exc)
    tags = {
        "git_commit": _git_commit(),
        "dvc_stage": os.environ.get("DVC_STAGE"),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
        "dvc_experiments": os.environ.get("DVC_EXP_NAME"),
        "prefect_flow_run_id": _prefect_flow_run_id(),
        "identity": identity,
        "estimator": params.advantage.estimator,
        **where,
        **{k: str(v) for k, v in (topology or {}).items() if v is not None},
    }
    # named as users tell runs apart: the DVC experiment when there is one, the estimator, the identity's start
    name = "-".join(p for p in (os.environ.get("DVC_EXP_NAME"), params.advantage.estimator, identity[:8]) if p)
    try:
        name = _unique_name(params, name, exp)
    except Exception as exc:  # a name is cosmetic
        log.warning("MLflow: could not check the run name %s against the experiment's (%s)", name, exc)
    _run = mlflow.start_run(run_name=name, tags={k: v for k, v in tags.items() if v})
    flat = params.flat()
    mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
    log.info("MLflow: run %s in %s", _run.info.run_id, mlflow.get_tracking_uri())
    return _run


def log_metric_dict(metrics: dict, step: int) -> None:
    import mlflow

    if _run is None:
        return
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(clean, step=step)


def log_missing_rounds(manifests: list[dict]) -> list[int]:
    """The complete rounds (`manifests`) whose metrics the resumed MLflow run lacks, logged now from their manifests:
    a run stopped between a round's manifest and its logging (the flow logs a round once its manifest is on disk);
    their steps. A round's completions table is not logged again."""
    import mlflow

    if _run is None or not manifests:
        return []
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(_run.info.run_id, "reward")}
    missing = [m for m in manifests if m["round"] + 1 not in logged]
    for m in missing:
        log_metric_dict(m["metrics"], step=m["round"] + 1)
    return [m["round"] + 1 for m in missing]


def log_round(metrics: dict, step: int, samples=None, scores=None, advantages=None, n: int = 16) -> None:
    import mlflow

    if _run is None:
        return
    log_metric_dict(metrics, step)
    if n and samples is not None and advantages is not None:
        # as TRL logs its completions: the prompt, the completion, each reward component, the advantage
        parts = [c for c in scores.columns if c.startswith("score/")]
        table = (
            samples.select("prompt_id", "sample_idx", "prompt_text", "completion", "num_tokens")
            .join(scores.select("prompt_id", "sample_idx", "score", *parts, "kl"), on=["prompt_id", "sample_idx"],
                  how="left")
            .join(advantages.select("prompt_id", "sample_idx", "advantage"), on=["prompt_id", "sample_idx"], how="left")
            .head(n)
        )
        mlflow.log_dict({"round": step, "completions": table.to_dicts()}, f"completions/round_{step:04d}.json")


def log_final_eval(params, run_id: str, metrics: dict, step: int, examples: str | None = None) -> bool:
    """The evaluate stage's held-out metrics (metrics/eval.json's, `final_eval/<name>`, at `step` = the policy's
    round) and its examples page (`final_eval/examples.md`) into the training run's MLflow run, finished or not, so
    the run holds the headline numbers `dvc metrics show` gives. Bookkeeping: a store or run that is not there is a
    warning, and False."""
    import math
    import time

    import mlflow
    from mlflow.entities import Metric

    try:
        open_store(params)
        client = mlflow.MlflowClient()
        client.get_run(run_id)
        now = int(time.time() * 1000)
        batch = [Metric(f"final_eval/{k}", float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=batch[i:i + 1000])
        if examples:
            client.log_text(run_id, examples, "final_eval/examples.md")
    except Exception as exc:
        log.warning("MLflow: the evaluation was not logged to the training run %s (%s)", run_id,
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        return False
    log.info("MLflow: logged the evaluation to run %s as final_eval/*", run_id)
    return True


def finish_run(summary: dict | None, history: list[dict], failed: bool = False) -> None:
    global _run
    import mlflow

    if _run is None:
        return
    try:
        if history and not failed:
            _log_curve(history)
    except Exception as exc:  # a plot must never fail a finished run
        log.warning("MLflow: could not log the reward curve (%s)", exc)
    mlflow.end_run(status="FAILED" if failed else "FINISHED")
    _run = None


def _log_curve(history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    rounds = list(range(1, len(history) + 1))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(rounds, [h.get("reward") for h in history], marker="o", label="train reward")
    if any("eval/reward" in h for h in history):
        pts = [(i, h["eval/reward"]) for i, h in zip(rounds, history) if "eval/reward" in h]
        ax[0].plot(*zip(*pts), marker="s", label="eval reward")
    ax[0].set_xlabel("round")
    ax[0].set_ylabel("reward")
    ax[0].legend()
    ax[1].plot(rounds, [h.get("kl") for h in history], marker="o", color="tab:red")
    ax[1].set_xlabel("round")
    ax[1].set_ylabel("KL to reference")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reward_curve.png"
        fig.savefig(path, dpi=100)
        mlflow.log_artifact(str(path), "plots")
        (Path(tmp) / "history.json").write_text(json.dumps(history, default=float))
        mlflow.log_artifact(str(Path(tmp) / "history.json"))
    plt.close(fig)
