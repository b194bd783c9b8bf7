"""Why the first update of a run takes longer than the later ones: each of `--steps` updates on one round's batch
(default params.yaml: prompts_per_round x K rows, max_completion_length tokens) timed whole and split into the
forward/backward passes and the optimizer step, in one process with the trainer kept warm as the flow keeps it.

    python benchmarks/first_update.py [--steps 4] [--with-engine]   # needs models/base and data/prepared (dvc repro prepare)

Prints a table (seconds per update); the README's Benchmarks section quotes it.
"""

from __future__ import annotations

import argparse
import os
import random
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
    args = ap.parse_args(argv)

    import polars as pl
    import torch

    from machine import describe
    from stages.io import read_table
    from stages.params import load_params
    from stages.sample import tokenize_prompts
    from stages.runtime import configure_env
    from stages.update import Trainer

    params = load_params(ROOT / "params.yaml")
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
    opt_s: list[float] = []
    inner = trainer.optimizer.step

    def timed_step(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        opt_s.append(time.perf_counter() - t)
        return out

    trainer.optimizer.step = timed_step
    lines = [f"{time.strftime('%Y-%m-%d')}, {describe()}; {rows} rows x {params.sample.max_completion_length} tokens, "
             f"bf16 autocast {params.update.bf16_autocast}", "", "| update | seconds | optimizer step | the rest |",
             "|---|---|---|---|"]
    for i in range(args.steps):
        before = len(opt_s)
        t = time.perf_counter()
        trainer.step(batch)
        total = time.perf_counter() - t
        opt = sum(opt_s[before:])
        lines.append(f"| {i + 1} | {total:.2f} | {opt:.2f} | {total - opt:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
