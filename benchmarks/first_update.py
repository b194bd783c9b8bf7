"""Why the first update of a run takes longer than the later ones: each of `--steps` updates on one round's batch
(default params.yaml: prompts_per_round x K rows, max_completion_length tokens) timed whole and split into the
forward/backward passes and the optimizer step, in one process with the trainer kept warm as the flow keeps it.

    python benchmarks/first_update.py [--steps 4] [--with-engine] [-S update.micro_batch_size=32 ...]
                                # needs models/base and data/prepared (dvc repro prepare)
    python benchmarks/first_update.py --engine-phases   # later updates alone, then with the engine started in the
                                # process, after a generation, its NUMA policy reset, GC frozen, the engine closed

`-S section.field=value` sets a parameter as `dvc exp run -S` does (the value read as YAML, as tune.py reads it),
e.g. to time the update with another micro-batch size. Prints a table (seconds per update, peak RSS); the README's
Benchmarks section quotes it.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main(argv: list[str] | None = None) -> None:
    from stages.runtime import preload_malloc

    if argv is None:  # with the malloc the training command runs with (tcmalloc where installed)
        preload_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--with-engine", action="store_true",
                    help="start the configured sampler (vLLM) in the process first and generate once, as the flow does")
    ap.add_argument("--engine-phases", action="store_true",
                    help="after 2 warm updates, time 3 updates per state: alone; the engine started (and generated); "
                         "after a further generation; vLLM's NUMA policy reset; Python's GC frozen; the engine closed; "
                         "twice more alone")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="set a parameter for this run (params.yaml stays as is), e.g. -S update.micro_batch_size=32")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps: at least 1")

    import polars as pl
    import torch

    from machine import describe
    from stages.io import read_table
    from stages.params import load_params
    from stages.sample import tokenize_prompts
    from stages.runtime import configure_env
    from stages.update import Trainer

    import yaml
    from tune import yaml_scalar

    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            sys.exit(f"error: -S {item}: expected SECTION.FIELD=VALUE, e.g. -S update.micro_batch_size=32")
        try:
            overrides[key] = yaml_scalar(value)
        except yaml.YAMLError:
            sys.exit(f"error: -S {item}: the value is not valid YAML; quote it, e.g. -S 'sample.stop=[\"END\"]'")
    params = load_params(ROOT / "params.yaml", overrides)
    configure_env(params.base.threads)
    model_dir = ROOT / params.base.model_dir
    if not (model_dir / "config.json").is_file():
        sys.exit(f"error: {model_dir} has no model: run `dvc repro prepare` first")
    # the first round's prompts: the engine's warm-up generation and the update's batch
    prompts = read_table(ROOT / "data" / "prepared" / "train.parquet").head(params.train.prompts_per_round)

    sampler = None
    if args.with_engine:
        from stages.models import load_tokenizer
        from stages.sample import generation_config, make_sampler, sample_prompts

        sampler = make_sampler(str(model_dir), params)
        sample_prompts(sampler, load_tokenizer(model_dir), prompts, generation_config(params.sample), 0, 0, 0,
                       params.sample.max_model_len)
    print(f"threads {torch.get_num_threads()}, affinity {sorted(os.sched_getaffinity(0))}, engine {bool(sampler)}")
    trainer = Trainer(str(model_dir), params, torch.device("cpu"), total_rounds=params.train.rounds)
    rows = params.train.prompts_per_round * params.sample.k
    rng = random.Random(0)
    vocab = trainer.tokenizer.vocab_size
    # the prompts rendered as the sampler renders them; random completion tokens of full length
    texts, _ = tokenize_prompts(trainer.tokenizer, prompts)
    batch = pl.DataFrame({
        "prompt_id": [prompts["prompt_id"][i // params.sample.k] for i in range(rows)],
        "sample_idx": [i % params.sample.k for i in range(rows)],
        "advantage": [rng.gauss(0, 1) for _ in range(rows)],
        "prompt_text": [texts[i // params.sample.k] for i in range(rows)],
        "completion_token_ids": [[rng.randrange(100, vocab) for _ in range(params.sample.max_completion_length)]
                                 for _ in range(rows)],
    })
    if args.engine_phases:
        engine_phases(trainer, batch, prompts, params, model_dir)
        return
    opt_s: list[float] = []
    inner = trainer.optimizer.step

    def timed_step(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        opt_s.append(time.perf_counter() - t)
        return out

    trainer.optimizer.step = timed_step
    lines = [f"{time.strftime('%Y-%m-%d')}, {describe()}; {rows} rows x {params.sample.max_completion_length} tokens, "
             f"bf16 autocast {trainer.autocast}" + "".join(f", {item}" for item in args.set), "",
             "| update | seconds | optimizer step | the rest |", "|---|---|---|---|"]
    times: list[float] = []
    for i in range(args.steps):
        before = len(opt_s)
        t = time.perf_counter()
        trainer.step(batch)
        total = time.perf_counter() - t
        times.append(total)
        opt = sum(opt_s[before:])
        lines.append(f"| {i + 1} | {total:.2f} | {opt:.2f} | {total - opt:.2f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    later = times[2:] or times
    lines += ["", f"mean of updates {3 if times[2:] else 1}-{len(times)}: {sum(later) / len(later):.2f} s; "
              f"peak RSS {peak:.2f} GiB"]
    print("\n".join(lines))


def reset_mempolicy() -> bool:
    """Undo the MEMBIND policy that vLLM's CPU worker sets on the process (`init_cpu_memory_env`): set_mempolicy
    (MPOL_DEFAULT) for this thread, Linux x86_64 only; True when it was reset."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    return ctypes.CDLL(None, use_errno=True).syscall(238, 0, None, 0) == 0  # 238: set_mempolicy


def engine_phases(trainer, batch, prompts, params, model_dir: Path) -> None:
    """Seconds of 3 updates in each state of one process (the warm trainer, the same batch)."""
    import gc

    from stages.models import load_tokenizer
    from stages.sample import generation_config, make_sampler, sample_prompts

    def timed(label: str) -> None:
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            trainer.step(batch)
            ts.append(time.perf_counter() - t)
        print(f"| {label} | {' '.join(f'{x:.2f}' for x in ts)} |", flush=True)

    def generate(sampler) -> None:
        sample_prompts(sampler, load_tokenizer(model_dir), prompts, generation_config(params.sample), 0, 0, 0,
                       params.sample.max_model_len)

    for _ in range(2):  # the first updates' one-off costs (AdamW's state, fresh buffers)
        trainer.step(batch)
    print("| state | seconds per update |\n|---|---|")
    timed("alone")
    sampler = make_sampler(str(model_dir), params)
    generate(sampler)
    timed("engine started, generated")
    generate(sampler)
    timed("after a further generation")
    if reset_mempolicy():
        timed("NUMA memory policy reset to the default")
    gc.freeze()
    timed("Python's GC frozen")
    gc.unfreeze()
    sampler.close()
    del sampler
    gc.collect()
    timed("engine closed")
    timed("alone again")


if __name__ == "__main__":
    main()
