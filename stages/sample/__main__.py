"""CLI: `python -m stages.sample --prompts P.parquet --out samples.parquet [--model DIR] [--round N]`."""

from __future__ import annotations

import argparse
import logging

from stages.errors import run_cli

log = logging.getLogger("stages.sample")


def main(argv: list[str] | None = None) -> None:
    from stages.io import read_table, write_table
    from stages.models import load_tokenizer
    from stages.params import load_params
    from stages.runtime import configure_env
    from stages.sample import GenerationConfig, make_sampler, sample_prompts
    from stages.schemas import PROMPTS, SAMPLES

    parser = argparse.ArgumentParser(prog="python -m stages.sample", description="K completions per prompt.")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    parser.add_argument("--prompts", default="data/prepared/train.parquet", help="prompts Parquet (schema PROMPTS)")
    parser.add_argument("--out", default="samples.parquet")
    parser.add_argument("--model", default=None, help="model dir (default: base.model_dir)")
    from stages.sample.backends import BACKENDS

    parser.add_argument("--backend", choices=["auto", *BACKENDS], default=None,
                        help="overrides sample.backend (auto: the first of the table that imports)")
    parser.add_argument("--round", type=int, default=0, help="round index (seeds)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    configure_env(params.base.threads)
    prompts = read_table(args.prompts, PROMPTS)
    if args.limit:
        prompts = prompts.head(args.limit)
    model_dir = args.model or params.base.model_dir
    tokenizer = load_tokenizer(model_dir, "--model" if args.model else "base.model_dir")
    sp = params.sample
    cfg = GenerationConfig(sp.k, sp.max_completion_length, sp.temperature, sp.top_p, list(sp.stop))
    from stages.sample import check_prompt_fit, tokenize_prompts

    # Validate before paying for the engine start-up.
    check_prompt_fit(prompts, tokenize_prompts(tokenizer, prompts)[1], sp.max_model_len, sp.max_completion_length)
    sampler = make_sampler(model_dir, params, args.backend, field="--model" if args.model else "base.model_dir")
    try:
        df, stats = sample_prompts(sampler, tokenizer, prompts, cfg, params.base.seed, args.round, 0, sp.max_model_len)
    finally:
        sampler.close()
    write_table(df, args.out, SAMPLES)
    log.info("wrote %s (%d rows, %.0f tokens/s)", args.out, df.height, stats["sample/tokens_per_s"])


if __name__ == "__main__":
    run_cli(main)
