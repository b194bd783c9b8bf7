"""The RLOO training flow: rounds of sample -> score -> advantage -> update, with everything expensive kept warm.

The story of a run (each step of a round is a Prefect task, all in this one process; docs/design.md §3):
1. take the checkout's run lock, find the resume point (`stages.loop.resume`): continue after the last complete
   round of this run, start clean when the configuration changed (the old run is moved aside), or stop with one
   line when the state on disk is inconsistent;
2. load what stays warm for the whole run: the vLLM engine, the policy with its optimizer, the reference and the
   reward models (`stages.loop.warm`);
3. per round: sample K completions per prompt -> score them (rewards, KL to the reference) -> advantages (the
   leave-one-out baseline, or the configured estimator) -> update (REINFORCE step(s); the new weights go into the
   running engine before it next generates) -> every `train.eval_every` rounds an evaluation on held-out prompts; each
   step's Parquet artifact is written as it is produced, then the checkpoint and the round's manifest, in a background
   thread that the next update waits for;
4. write metrics/train.json and plots/train.csv, close the MLflow run.

Run: `python -m flows.train [--params params.yaml] [--rounds N] [--restart]` (what the DVC stage `train` runs).
Without a Prefect API (`PREFECT_API_URL`), the flow runs against a temporary local server started for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from stages.errors import PipelineError, bad_input_exits, run_cli
from stages.runtime import preload_malloc

# The command line re-executes itself once with tcmalloc preloaded (RLOO_MALLOC, docs/design.md §7) before polars,
# Prefect and torch load, so the imports below come after it; a bad setting is one `error:` line.
# ruff: noqa: E402
if __name__ == "__main__":
    with bad_input_exits():
        preload_malloc()

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from stages.loop import steps
from stages.loop.resume import MANIFEST, round_dir, round_prompts
from stages.loop.warm import Warm
from stages.params import Params, load_params


def _no_retry_on_bad_input(task, task_run, state) -> bool:
    """A step is tried again once, except on bad input, on a broken pipe (the process that reads this one's output,
    a scheduled pipeline, is gone: the run stops, and the next resumes after its completed rounds) and on a broken
    collective (several ranks: a retry would wait for the same peer), nor on a file or dir this user may not write
    (the machine's setup: a retry meets the same permissions)."""
    try:
        state.result()
    except (PipelineError, BrokenPipeError):
        return False
    except Exception as exc:
        from stages.errors import dist_broken, not_writable

        # a collective that timed out, or whose peer is gone (the group is broken); a permission or read-only mount
        return dist_broken(exc) is None and not_writable(exc) is None
    return True


_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
SQL_POOL_LOGGER = "sqlalchemy.pool.impl.QueuePool"  # MLflow's SQL store's connection pool


@task(name="sample", retries=1, retry_condition_fn=_no_retry_on_bad_input, **_TASK)
def sample_task(w: Warm, r: int, prompts: pl.DataFrame, d: Path) -> tuple[pl.DataFrame, dict, dict]:
    from stages.loop.writer import write_artifact
    from stages.schemas import SAMPLES

    # The update's weights go into the engine here, before the try's sampling: a try that fails after the push
    # (sampling, or writing its samples) leaves the push's seconds to the retry, which finds the engine up to date
    # and reports them instead of its own 0 (docs/design.md §3)
    push_s, w.unreported_push_s = w.unreported_push_s + steps.sync_sampler(w), 0.0
    try:
        df, stats = steps.sample_round(w, r, prompts)  # nothing left to push
        stats["time/weight_sync_s"] += push_s
        return df, stats, write_artifact(df, d, "samples", SAMPLES) if w.dist.main else None
    except BaseException:
        w.unreported_push_s = push_s
        raise


@task(name="score", **_TASK)
def score_task(w: Warm, samples: pl.DataFrame, d: Path) -> tuple[pl.DataFrame, dict, dict]:
    from stages.loop.writer import write_artifact
    from stages.schemas import SCORES

    df, stats = steps.score_round(w, samples)
    return df, stats, write_artifact(df, d, "scores", SCORES) if w.dist.main else None


@task(name="advantage", **_TASK)
def advantage_task(w: Warm, scores: pl.DataFrame, d: Path) -> tuple[pl.DataFrame, dict, dict, dict]:
    from stages.loop.writer import write_artifact
    from stages.schemas import ADVANTAGES

    df, state, stats = steps.advantage_round(w, scores, str(d / "scores.parquet"))
    return df, state, stats, write_artifact(df, d, "advantages", ADVANTAGES) if w.dist.main else None


@task(name="update", **_TASK)
def update_task(w: Warm, samples: pl.DataFrame, advantages: pl.DataFrame) -> dict:
    return steps.update_round(w, samples, advantages)


@task(name="evaluate", **_TASK)
def evaluate_task(w: Warm, version: int) -> dict:
    return steps.evaluate_round(w, version)


def _round_markdown(r: int, rounds: int, m: dict) -> str:
    keys = ["reward", "reward_std", "kl", "rlhf_reward", "advantage_std", "loss", "grad_norm", "entropy",
            "completions/mean_length", "completions/clipped_ratio", "time/round_s"]
    rows = "\n".join(f"| {k} | {m[k]:.4f} |" for k in keys if isinstance(m.get(k), (int, float)))
    return f"### Round {r + 1} of {rounds}\n\n| metric | value |\n|---|---|\n{rows}\n"


@flow(name="rloo-train", log_prints=False)
def train_flow(params_path: str = "params.yaml", rounds: int | None = None, overrides: dict | None = None,
               restart: bool = False) -> dict:
    """RLOO training: `rounds` rounds of sample -> score -> advantage -> update, resources kept warm."""
    from stages.errors import params_file_named, quiet_bad_input_tracebacks
    from stages.loop.lock import deployment_wait_s, in_deployment, locked_outputs, run_lock

    quiet_bad_input_tracebacks()
    # several ranks: the launcher's SIGTERM (another rank failed) can land inside MLflow's sqlite store, whose pool
    # then logs "Error closing cursor" with the whole chain; once another rank has reported, that is its echo
    quiet_bad_input_tracebacks(SQL_POOL_LOGGER)
    early = load_params(params_path, overrides)  # a bad file fails now, not after waiting for the lock
    if in_deployment():
        check_not_params_yaml_s_outputs(params_path, overrides, early)
    # a scheduled run queues behind the lock's holder; a served or deployed run's advice names its params file too
    with params_file_named(params_path), run_lock("training run", wait_s=deployment_wait_s(),
                                                  outputs=locked_outputs(early)):
        params = load_params(params_path, overrides)  # as it is once the lock is ours (the holder may have raised
        return run_training(params, rounds or params.train.rounds, restart)  # train.rounds or changed it)


def check_not_params_yaml_s_outputs(params_path: str, overrides: dict | None, params: Params,
                                    main: str | Path = "params.yaml") -> None:
    """A deployment's run (`train-now`, a served flow) of another configuration than params.yaml's (another
    `params_path`, or `overrides`) in params.yaml's output dirs is refused: it would move params.yaml's run, the one
    `dvc repro` and the nightly pipeline continue, to the archive, and the next nightly would move it back and train
    its own from round 0 (found 2026-12-07: both runs completed, nothing in Prefect said so). At a terminal the same
    run goes on, as its warning says (the archive keeps both)."""
    from stages.loop.lock import locked_outputs

    main = Path(main)
    if not main.is_file() or (not overrides and Path(params_path).resolve() == main.resolve()):
        return  # no params.yaml, or params.yaml itself: the same configuration by construction
    try:
        ours = load_params(main)
    except PipelineError as exc:  # its output dirs unknown: a run in them would archive the scheduled run
        raise PipelineError(f"{main}: does not load ({str(exc)[:300]}), so whether {params_path} would train in its "
                            f"output dirs cannot be told; fix {main} first") from exc
    if ours.identity() == params.identity():
        return
    names = ("train.rounds_dir", "train.checkpoint_dir", "train.state_dir")
    shared = [n for n, a, b in zip(names, locked_outputs(params), locked_outputs(ours))
              if Path(a).resolve() == Path(b).resolve()]
    if shared:
        what = f"{params_path}{' with overrides' if overrides else ''}"
        raise PipelineError(f"params_path: {what} is another configuration than {main}'s in the same output dirs "
                            f"({', '.join(shared)}): its run would move {main}'s run (the one `dvc repro` and the "
                            f"scheduled pipeline continue) to the archive; give it its own {', '.join(shared)}, or "
                            f"edit {main} itself to change the configuration of the scheduled runs")


def run_training(params: Params, total: int, restart: bool = False) -> dict:
    """The body of the flow (see the module docstring). Rank 0 runs it inside the flow run and under the run lock;
    with several ranks the others run it bare: the same steps, no files, no Prefect, no MLflow (docs/design.md §8)."""
    from stages.loop.dist import init_distributed
    from stages.loop.resume import (
        apply_plan,
        check_total,
        plan_resume,
        restore_interrupted,
        restore_run,
    )
    from stages.loop.warm import load_warm
    from stages.runtime import configure_env, find_malloc, malloc_in_use, sampler_dtype, score_dtype

    configure_env(params.base.threads)
    dist, device = init_distributed(params.base.device, params.train.dist_timeout_s)
    logger, call = (get_run_logger(), lambda t: t) if dist.main else (logging.getLogger(__name__), lambda t: t.fn)
    tp, identity = params.train, params.identity()
    malloc = malloc_in_use()
    topology = {"world_size": dist.world_size, "backend": dist.backend, "malloc": malloc,
                "strategy": params.update.strategy if dist.enabled else None,
                # what the `auto` dtypes resolved to on this machine (docs/design.md §7)
                "sample_dtype": sampler_dtype(params.sample.dtype, params.score),
                "score_dtype": score_dtype(params.score.dtype)}
    installed = find_malloc()
    if malloc == "glibc" and installed and dist.main:  # e.g. a flow run spawned by a Prefect worker
        logger.warning("%s is installed but not preloaded in this process: rounds run ~20 %% slower with glibc's "
                       "malloc; start this process (or its Prefect worker) with LD_PRELOAD=%s", installed, installed)

    # 1. where this run stands (decided and acted on by rank 0, then known to every rank)
    plan = None
    if dist.main:
        restore_interrupted(params)  # a run killed outright in round 1 after moving another aside: undone now
        plan = plan_resume(params, identity, restart)
        check_total(plan, total, "train.rounds (or --rounds)")
        if plan.superseded is None:
            apply_plan(plan, params)
    plan = dist.broadcast(plan)
    start = plan.start
    if plan.rebuilt and start >= total:  # nothing to train: no optimizer state needed, the checkpoint stays as it is
        plan = dataclasses.replace(plan, replay=[])
    if start:
        logger.info("resuming after round %d of %d (run %s)", start, total, identity)
    if start >= total:
        logger.info("all %d rounds already complete", total)
        if not plan.replay and plan.superseded is None:
            current = dist.broadcast(_current_outputs({identity, *params.identity_aliases()}, total, plan.done) if dist.main else None)
            if current is not None:  # nothing to train and nothing to write: no model loads, no file or MLflow change
                if dist.main and plan.done:
                    from stages.io import read_table
                    from stages.loop.resume import report_untrained, split_record
                    from stages.loop.warm import PREPARED_TRAIN

                    if Path(PREPARED_TRAIN).is_file():
                        report_untrained(logger, plan.done[-1], split_record(read_table(PREPARED_TRAIN)), total)
                logger.info("metrics/train.json and plots/train.csv are this run's already: nothing loaded or written")
                return current

    # 2. what stays warm; first what the load would refuse that the user names (a reward that cannot be built, a
    # column it needs, the reference dir, a prompt too long for the engine), checked in a moment instead of after the
    # models and the engine load (its imports are the load's own: counted in the warm start)
    from stages.loop.warm import check_inputs

    t0 = time.perf_counter()
    check_inputs(params)
    if dist.main:
        logger.info("loading what stays warm for the run: the trainer, the reference, the rewards and the sampler")
    w = load_warm(params, total, plan.checkpoint, with_eval=bool(tp.eval_every) and start < total, dist=dist,
                  device=device)
    w.adv_state = plan.adv_state  # the carried baseline (ema, moving_average)
    archived = None
    if plan.superseded is not None:
        # another run moves aside only now that this one's models, rewards and engine loaded on every rank: a bad
        # new setting (a reward, a model dir) fails above with the old run still in place; one that fails (or is
        # stopped) before completing a round puts it back (restore_run)
        dist.barrier()
        if dist.main:
            archived = apply_plan(plan, params)
    try:
        summary = _train(params, total, dist, device, logger, call, w, plan, identity, topology, t0, archived)
    except BaseException:
        if archived is not None:
            try:
                restore_run(params, archived)
            except Exception as e:  # the run's own failure is the one to report
                logger.warning("could not move the previous run back from %s: %s", archived.dest, e)
        raise
    finally:
        w.trainer.drop_ahead()  # a forward kept by a score step whose update never ran: its activations freed
        w.sampler.close()
    return summary


def _train(params: Params, total: int, dist, device, logger, call, w, plan, identity: str, topology: dict,
           t0: float, archived=None) -> dict:
    """The rounds of `run_training`, from the warm resources on. `archived`: where this run moved the previous one
    (`archive_run`); its marker goes with this run's first complete round, after which that run stays archived for
    good (a later start does not take it for one to put back, even if you delete this run's rounds by hand)."""
    from stages import tracking
    from stages.evaluate import flat_metrics
    from stages.loop.lock import LOCK_PATH, still_held
    from stages.loop.resume import keep_archived, new_prompts, report_resolution_change, report_untrained, split_record
    from stages.loop.writer import RoundWriter, manifest_for, round_write, write_run_outputs

    tp, start = params.train, plan.start
    # resolved by the warm trainer: the micro-batch cap (`auto` by CPU kind) and where the policy's logprobs come from
    topology = topology | {"micro_batch_size": w.trainer.micro_cap, "policy_logprobs": steps.policy_logprobs_source(w)}
    warm_s = time.perf_counter() - t0
    logger.info("warm resources ready in %.1f s (sampler: %s, ranks: %d)", warm_s, w.sampler.name, dist.world_size)
    run = None
    if dist.main:
        # the run's params as this invocation runs them: `--rounds N` is its train.rounds (a resumed run's tag
        # `latest.train.rounds`, a new run's param)
        ran = params if params.train.rounds == total else params.model_copy(
            update={"train": params.train.model_copy(update={"rounds": total})})
        run = tracking.start_run(ran, identity, resume_id=plan.done[-1].get("mlflow_run_id") if plan.done else None,
                                 topology=topology)
        tracking.log_metric_dict({"time/warm_start_s": warm_s}, step=start)
        filled = tracking.log_missing_rounds(plan.done)
        if filled:
            resumed = run is not None and plan.done and run.info.run_id == plan.done[-1].get("mlflow_run_id")
            why = ("that the run stopped before logging" if resumed or not plan.done[-1].get("mlflow_run_id") else
                   "whose MLflow run is not in this store (a pulled or copied run)")
            logger.info("MLflow: logged %d complete round%s %s (from %s)", len(filled), "" if len(filled) == 1 else "s",
                        why, "its manifest" if len(filled) == 1 else "their manifests")
    if plan.replay:  # complete rounds after an older checkpoint (update.save_every > 1): their updates, again
        from stages import checkpoint

        t1 = time.perf_counter()
        if plan.rebuilt:
            logger.warning("%s: the optimizer state of the checkpoint at round %d is not in %s (it is kept out of DVC's "
                           "cache); rebuilding it: the updates of rounds 1-%d are replayed from the base model and their "
                           "artifacts", tp.checkpoint_dir, plan.rebuilt["round"], tp.state_dir, start)
        for m in plan.replay:  # each under the schedule it ran under (a raised train.rounds plans the rounds after)
            w.trainer.plan_schedule(m.get("total_rounds", total))  # (a manifest from before 2026-12-07 has none)
            steps.replay_round(w, round_dir(tp.rounds_dir, m["round"]))
            if plan.rebuilt and m["round"] + 1 == plan.rebuilt["round"]:
                # the replay gave the optimizer state; the weights stay the checkpoint's (another machine's arithmetic
                # would have drifted them), verified first: the replay is compared with them, and goes on from them
                if dist.enabled or params.update.use_lora:
                    logger.info("the replayed policy at round %d is not compared with the checkpoint's weights (%s)",
                                m["round"] + 1, "several ranks" if dist.enabled else "LoRA: merged weights")
                else:
                    checkpoint.verify_model(tp.checkpoint_dir, plan.rebuilt)
                    gap = steps.keep_checkpoint_weights(w.trainer, tp.checkpoint_dir)
                    (logger.info if gap <= 1e-4 else logger.warning)(
                        "the replayed policy at round %d differs from the checkpoint's weights by at most %.2e; the "
                        "checkpoint's weights are kept%s", m["round"] + 1, gap,
                        "" if gap <= 1e-4 else " (the replay ran on another machine's arithmetic, or under settings "
                        "that changed since: its optimizer state is approximate)")
        w.trainer.plan_schedule(total)
        gathered = w.trainer.gathered_state()  # FSDP: every rank takes part
        if dist.main:  # the checkpoint catches up with the last complete round (its manifest is already written)
            checkpoint.save(w.trainer, tp.checkpoint_dir, tp.state_dir, {"identity": identity, "manifest": plan.done[-1]},
                            gathered=gathered)
        first, last = plan.replay[0]["round"] + 1, plan.replay[-1]["round"] + 1
        logger.info("replayed the update%s from %s artifacts (%s) and saved the checkpoint at round %d, in %.1f s",
                    f" of round {first}" if first == last else f"s of rounds {first}-{last}",
                    "its" if first == last else "their",
                    "from the base model" if plan.rebuilt else f"the checkpoint was at round {first - 1}", start,
                    time.perf_counter() - t1)

    # 3. the rounds
    history = [m["metrics"] for m in plan.done]
    seen = [m.get("prompt_ids", []) for m in plan.done]  # which prompts each round trained on: the schedule's memory
    split = split_record(w.train_prompts)
    added = frozenset(new_prompts(plan.done[-1], split)) if plan.done else frozenset()  # they come first
    if start >= total and plan.done:
        report_untrained(logger, plan.done[-1], split, total)
    elif plan.done and dist.main:
        report_resolution_change(logger, plan.done[-1], topology)
    writer = RoundWriter(tp.async_checkpoint and dist.main)
    # A round reaches MLflow once its manifest is on disk (a round killed before that is re-done at the next start:
    # MLflow would have it twice): `unlogged` are rounds submitted to the writer, `complete` those whose write it
    # confirmed, logged after the next round's submit (outside the rounds' timing, while that write runs). A stop
    # between a manifest and its logging leaves a gap that the next start fills from the manifests.
    unlogged: list[tuple] = []
    complete: list[tuple] = []

    def settled(wait) -> float:
        try:
            waited = wait()
        except BaseException:  # a failed write's round is not complete (a stopped wait's may be: filled later)
            unlogged.clear()
            raise
        complete.extend(unlogged)
        unlogged.clear()
        return waited

    def log_complete() -> None:
        while complete:
            m, step, *tables = complete.pop(0)
            tracking.log_round(m, step=step, samples=tables[0], scores=tables[1], advantages=tables[2],
                               n=params.mlflow.log_completions)

    t_rounds = time.perf_counter()
    try:
        for r in range(start, total):
            if not still_held():
                raise PipelineError(f"{LOCK_PATH}: the process that passed this run the checkout's run lock has ended "
                                    f"(killed?), so the lock is free and another run could start beside this one; "
                                    f"stopped before round {r + 1} (the rounds before it are complete): run again to "
                                    "resume")
            tr, d = time.perf_counter(), round_dir(tp.rounds_dir, r)
            prompts = round_prompts(w.train_prompts, r, tp.prompts_per_round, params.base.seed, seen, added)
            seen.append(prompts["prompt_id"].to_list())
            samples, s_stats, s_rec = call(sample_task)(w, r, prompts, d)
            scores, sc_stats, sc_rec = call(score_task)(w, samples, d)
            advs, new_state, a_stats, a_rec = call(advantage_task)(w, scores, d)
            wait_s = settled(writer.wait)  # the previous round's checkpoint is on disk before the weights change
            u_stats = call(update_task)(w, samples, advs) | {"time/checkpoint_wait_s": wait_s}
            w.adv_state = new_state
            metrics = {**s_stats, **sc_stats, **u_stats, **{k: a_stats[k] for k in
                       ("advantage_std", "advantage_mean", "baseline_mean", "singleton_groups")}}
            if tp.eval_every and (r + 1) % tp.eval_every == 0:
                # the evaluation samples from this update's weights: pushed now and counted in this round's push time
                # (the next round's sampling then has none to push)
                metrics["time/weight_sync_s"] = metrics.get("time/weight_sync_s", 0.0) + steps.sync_sampler(w)
                metrics |= flat_metrics(call(evaluate_task)(w, r + 1), "eval/")
            metrics["time/round_s"] = time.perf_counter() - tr
            save = (r + 1) % params.update.save_every == 0 or r + 1 == total
            gathered = w.trainer.gathered_state() if save else None  # FSDP: every rank takes part
            history.append(metrics)
            if not dist.main:
                continue
            artifacts = {"samples.parquet": s_rec, "scores.parquet": sc_rec, "advantages.parquet": a_rec}
            # total_rounds: the length whose schedule this round's update ran under (a resume's replay uses it)
            manifest = manifest_for(r, identity, params.hash(), artifacts, metrics, new_state,
                                    run.info.run_id if run else None,
                                    topology | {"prompt_ids": seen[-1], "train_split": split, "total_rounds": total})
            write = round_write(w.trainer, params, manifest, d / MANIFEST, save, gathered)
            if archived is not None and r == start:  # the manifest first: until it is on disk a crash moves it back
                write = _then(write, lambda: keep_archived(archived))
            writer.submit(write)
            unlogged.append((metrics, r + 1, samples, scores, advs))
            if writer.pool is None:  # written in line: complete now
                settled(lambda: 0.0)
            log_complete()
            create_markdown_artifact(_round_markdown(r, total, metrics), key="rloo-round", description=f"round {r + 1}")
            # not the loss: with one epoch its ratio is 1, and the loss of a zero-mean advantage (rloo, grpo) is 0
            logger.info("round %d/%d: reward %.3f, kl %.4f, grad norm %.3f, %.1f s (sample %.1f, update %.1f)", r + 1,
                        total, metrics["reward"], metrics["kl"], metrics["grad_norm"], metrics["time/round_s"],
                        metrics["time/sample_s"], metrics["time/update_s"])
        last_wait_s = settled(writer.close)
        log_complete()
        # 4. the run's outputs
        summary = {}
        if dist.main:
            summary = write_run_outputs(history, total, identity, warm_s, time.perf_counter() - t0, total - start,
                                        time.perf_counter() - t_rounds, run.info.run_id if run else None,
                                        last_wait_s) | topology
            tracking.finish_run(summary, history)
            _say_where(logger, params, total, total - start, run.info.run_id if run else None)
        dist.barrier()  # the others end once rank 0 has written everything
        return summary
    except BaseException:
        try:
            settled(writer.close)  # the completed rounds' checkpoint and manifest still reach the disk
            log_complete()
        finally:
            if dist.main:
                tracking.finish_run(None, history, failed=True)
        raise


def _current_outputs(identities: set[str], total: int, done: list[dict]) -> dict | None:
    """metrics/train.json when this very run wrote it over `total` rounds (one of its identities, with the ones an
    earlier version gave it, and the MLflow run of its last round: an archived run of the same settings has another),
    else None. The file is written last (`write_run_outputs`), so plots/train.csv is as current."""
    from stages.loop.writer import METRICS_FILE

    try:
        summary = json.loads(Path(METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    run_id = done[-1].get("mlflow_run_id") if done else None
    mine = (isinstance(summary, dict) and summary.get("identity") in identities and summary.get("rounds") == total
            and run_id is not None and summary.get("mlflow_run_id") == run_id)
    return summary if mine else None


def _say_where(logger, params: Params, total: int, trained: int, run_id: str | None) -> None:
    """The run's last line: what it trained and where each output is (the rounds, the policy, the metrics, MLflow)."""
    import mlflow

    from stages.loop.writer import METRICS_FILE, PLOTS_FILE

    tp = params.train
    logger.info("done: %d rounds (%d trained now); rounds in %s, the policy in %s, metrics in %s and %s%s", total,
                trained, tp.rounds_dir, tp.checkpoint_dir, METRICS_FILE, PLOTS_FILE,
                f"; MLflow run {run_id} in {mlflow.get_tracking_uri()}" if run_id else "")


def _then(first, second):
    """One call that runs `first`, then `second` (the round writer runs it in its thread)."""
    def both() -> None:
        first()
        second()
    return both


def main(argv: list[str] | None = None) -> None:
    from stages.errors import params_file_named

    parser = argparse.ArgumentParser(prog="python -m flows.train", description="Run the RLOO training flow.")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="train this many rounds in all (default: train.rounds)")
    parser.add_argument("--restart", action="store_true",
                        help="start over: move the current run (rounds, checkpoint, state) to train.archive_dir first")
    args = parser.parse_args(argv)
    with params_file_named(args.params):  # its advice (start over with --restart, ...) names this params file
        _main(args, argv)


def nproc_per_node(params: Params) -> int:
    """The processes of a training run: RLOO_NPROC_PER_NODE where set (a GPU deployment's), else
    train.nproc_per_node."""
    raw = os.environ.get("RLOO_NPROC_PER_NODE", "").strip()
    if not raw:
        return params.train.nproc_per_node
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise PipelineError(f"RLOO_NPROC_PER_NODE: must be a whole number >= 1 (got {raw!r}); it overrides "
                            "train.nproc_per_node: unset it or set the number of processes")
    return int(raw)


def _main(args: argparse.Namespace, argv: list[str] | None) -> None:
    from flows.api import prefect_api, start_server
    from stages.loop.dist import init_distributed, launched_by_torchrun
    from stages.loop.lock import locked_outputs, run_lock
    from stages.loop.resume import check_total, plan_resume, restore_interrupted

    if args.rounds is not None and args.rounds < 1:
        raise PipelineError(f"--rounds: must be >= 1 (got {args.rounds}); omit it to train train.rounds rounds")
    params = load_params(args.params)  # fail fast, before Prefect starts
    total, total_field = args.rounds or params.train.rounds, "--rounds" if args.rounds else "train.rounds"
    nproc = nproc_per_node(params)  # a GPU deployment sets RLOO_NPROC_PER_NODE
    if nproc > 1 and not launched_by_torchrun():
        from stages.update import check_ranks

        check_ranks(params, nproc)  # once here, not once per rank after each has loaded
        with run_lock("training run", outputs=locked_outputs(params)):  # the ranks go on under this lock
            # what the ranks would refuse, once here: one line, not one per rank and torchrun's traceback
            from stages.loop.warm import check_inputs

            restore_interrupted(params)
            check_total(plan_resume(params, params.identity(), args.restart), total, total_field)
            check_inputs(params)
            try:
                code = _torchrun(nproc, argv if argv is not None else sys.argv[1:])
            finally:  # a rank the launcher stopped (another rank failed) cannot put back a run it moved aside
                restore_interrupted(params)
            sys.exit(code)
    dist, _ = init_distributed(params.base.device, params.train.dist_timeout_s)
    if not dist.main:  # the other ranks: the same rounds, bare (rank 0 owns the lock, the files and Prefect)
        for name in ("", "stages", "flows", "__main__"):  # run_cli set ours to INFO: rank 0 tells the story
            logging.getLogger(name).setLevel(logging.WARNING)
        run_training(params, total, args.restart)
        return
    # a second run (here, or in a checkout whose params name the same output dirs) fails here, in one line (the flow
    # re-enters the lock)
    with run_lock("training run", outputs=locked_outputs(params)):
        restore_interrupted(params)  # before the plan: a run killed outright in round 1 is undone first
        plan = plan_resume(params, params.identity(), args.restart)  # an inconsistent or damaged run: one line, now
        check_total(plan, total, total_field)
        server = start_server()  # a temporary Prefect server boots on the other core while this process imports
        preload_flow_modules(params, open_store=plan.start < total)  # a run with nothing to train may touch no store
        with prefect_api(started=server), _pipeline_tag():
            train_flow(params_path=args.params, rounds=args.rounds, restart=args.restart)


def _pipeline_tag():
    """Under the scheduled pipeline: the tag of the pipeline run that runs this stage, on this flow run (so that the
    pipeline marks it Crashed if this process is killed before it can end it: `pipeline.crash_stage_runs`)."""
    import contextlib

    from prefect import tags

    tag = os.environ.get("RLOO_PIPELINE_TAG")
    return tags(tag) if tag else contextlib.nullcontext()


def preload_flow_modules(params: Params, open_store: bool = True) -> None:
    """Import what the flow's warm start needs (torch, transformers, MLflow, vLLM unless the sampler is hf) and, with
    `open_store` (the command passes whether any round is left to train), open the MLflow store and experiment while
    the temporary Prefect server boots: ~13 s of imports and ~8 s of boot on the 2-core AVX2 EPYC, side by side
    instead of one after the other (docs/design.md §7). A store or experiment that does not open (a bad URI, a
    tracking server that does not answer, a deleted experiment) stops the command here, in one line, before any
    model loads."""
    import importlib.util

    import mlflow  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if params.sample.backend != "hf" and importlib.util.find_spec("vllm") is not None:
        import vllm  # noqa: F401
    if not open_store:
        return
    from stages import tracking
    from stages.models import _first_line

    field, uri = tracking.store_uri(params)  # before open_store puts params.yaml's into the environment
    try:
        tracking.open_store(params)
    except tracking.StoreError as exc:
        why = _first_line(exc.__cause__)[:300] if exc.__cause__ else str(exc)  # (a StoreError of ours says it all)
        raise PipelineError(f"{field}: the MLflow store {uri} did not open ({why}); fix the URI or start its "
                            "tracking server") from exc
    except Exception as exc:
        raise PipelineError(f"mlflow.experiment: {params.mlflow.experiment!r} could not be set in the MLflow store "
                            f"{uri} ({_first_line(exc)[:300]}); name another experiment, or restore it if it was "
                            "deleted") from exc


def timeout_line(told: dict[int, dict], nproc: int) -> str | None:
    """The launcher's line when ranks reported a collective that timed out (`bad_input_exits`: gloo's "Timed out
    waiting ...ms"), else None. The ranks that reported waited; one of the others never came to the collective (hung,
    or slower there). Which one is known only where a single rank did not report: a rank that waited but was stopped
    by the launcher before it could report looks the same as the late one."""
    waited = sorted(rank for rank, r in told.items() if r["kind"] == "timeout")
    if not waited:
        return None
    rest = sorted(set(range(nproc)) - set(waited))
    late = (f"rank {rest[0]} never came to it" if len(rest) == 1 else
            f"one of ranks {', '.join(map(str, rest))} never came to it (those that did not report waiting)")
    return (f"error: rank{'s' if len(waited) > 1 else ''} {', '.join(map(str, waited))} waited train.dist_timeout_s "
            f"for the other ranks in a collective and gave up ({told[waited[0]]['message'][:200]}); {late} (busy or "
            "hung in a step of its own, e.g. a reward function: `py-spy dump --pid <pid>` on a hung rank shows where): "
            "raise train.dist_timeout_s if that step is only slow there. The ranks were stopped; what was complete is "
            "kept: run the command again to continue")


def _torchrun(nproc: int, argv: list[str]) -> int:
    """`python -m flows.train` with train.nproc_per_node > 1: the same command over `nproc` ranks on this node, launched
    by torchrun's own launcher in this process (docs/design.md §8). The ranks leave a bad-input message or a Ctrl-C
    in a reports directory instead of printing it, and this process tells the outcome once: one `error:` line and exit
    code 2 for bad input (whichever rank met it), one `interrupted:` line and 130 for Ctrl-C (which torchrun's launcher
    passes on to the ranks, each in its own session), and for a crashed or killed rank a line naming it (its traceback
    is above) and exit code 1."""
    import signal
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as launch

    from stages.errors import RANK_REPORTS_ENV, read_rank_reports

    log = logging.getLogger(__name__)
    # Ctrl-C: the launcher passes it on to each rank (each in its own session) and waits for them to stop as one
    # process would (the completed rounds' checkpoint reaches the disk); a second Ctrl-C must not cut that short
    args = ["--standalone", f"--nproc_per_node={nproc}", "--signals-to-handle=SIGTERM,SIGHUP,SIGQUIT", "-m",
            "flows.train", *argv]
    log.info("train.nproc_per_node=%d: %s -m torch.distributed.run %s", nproc, sys.executable, " ".join(args))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # its own failure report (and traceback) is told below
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SignalException("Ctrl-C", sigval=signal.SIGINT)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    signalled, failures = None, {}
    with tempfile.TemporaryDirectory(prefix="rloo-ranks-") as reports:
        os.environ[RANK_REPORTS_ENV] = reports
        signal.signal(signal.SIGINT, on_sigint)
        try:
            launch(parse_args(args))
            return 0
        except ChildFailedError as exc:
            failures = exc.failures
        except SignalException as exc:  # Ctrl-C or a kill: the launcher passed it on to each rank and waited for them
            signalled = exc.sigval
        finally:
            for sig, handler in previous.items():  # the launcher's handlers go with it
                signal.signal(sig, handler)
            os.environ.pop(RANK_REPORTS_ENV, None)
        told = read_rank_reports(reports)
    peers = {rank for rank, r in told.items() if r["kind"] == "peer"}  # their collective broke: another rank stopped
    told = {rank: r for rank, r in told.items() if rank not in peers}
    errors = sorted({r["message"] for r in told.values() if r["kind"] == "error"})
    if errors:  # bad input that only a round met: the same message from each rank that met it, once
        raise PipelineError(errors[0] if len(errors) == 1 else " | ".join(
            f"rank {rank}: {r['message']}" for rank, r in sorted(told.items()) if r["kind"] == "error"))
    if signalled == signal.SIGINT or (told and all(r["kind"] == "interrupted" for r in told.values())):
        raise KeyboardInterrupt
    if signalled is not None:
        print(f"stopped by {signalled.name}: the ranks were stopped with it. What was complete is kept: run the "
              "command again to continue", file=sys.stderr)
        return 128 + int(signalled)
    line = timeout_line(told, nproc)
    if line:
        print(line, file=sys.stderr)
        return 1
    # the rank that failed first: killed by a signal of its own, then one that exited (perhaps its peer's victim),
    # last the ranks the launcher stopped itself (SIGTERM) or whose collective broke after another's report (peers)
    stopped = {rank for rank, f in failures.items() if f.exitcode == -signal.SIGTERM}
    ranked = sorted(failures.items(), key=lambda kv: (kv[0] in peers, kv[0] in stopped, kv[1].exitcode >= 0,
                                                      kv[1].timestamp, kv[0]))

    def how(f) -> str:
        return f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"

    (rank, first), others = ranked[0], [f"rank {r} {how(f)}" for r, f in ranked[1:] if r not in peers | stopped]
    print(f"error: rank {rank} (local_rank: {first.local_rank}, pid {first.pid}) {how(first)}"
          + (" (its output above says why)" if first.exitcode > 0 else "")
          + (f"; also {', '.join(others)}" if others else "")
          + "; the other ranks were stopped. What was complete is kept: run the command again to continue",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    run_cli(main)
