"""vLLM on the CPU: one of this project's changes to its engine against vLLM's own, in pairs on a warm engine.

On the default task's warm engine, in one process (`--change`):

- `norms`: its RMSNorms through its compiled kernels (the default, `stages.sample.vllm_backend.cpu_norm_kernels`)
  against its native torch ones;
- `sampler`: its sampler's draw by inverting the softmax's running sum (the default,
  `stages.sample.vllm_backend.inverse_cdf_draw`) against its own Gumbel noise per vocabulary entry.

Each pair samples one round's prompts (params.yaml: prompts_per_round x K completions, the round's seeds) with both,
the order alternating from pair to pair, the prefix cache emptied before each (as a weight push empties it in a
run); the first pair warms up and is left out. The engine's logprobs of its own samples are held against an fp32
trainer pass over them (the engine is not updated in between: it samples the base policy): the mean |error| per
sequence, so that a faster norm that loses precision shows. Both arms draw with the same seeds on the same prompts,
but their samples differ where the rounding tips a draw (norms) or are other draws (sampler).

    python benchmarks/vllm_norms.py [--change norms|sampler] [--rounds 8] [--out benchmarks/results/vllm_CHANGE]

Writes OUT.json and OUT.md (medians, each pair's times, the machine). Needs `dvc repro prepare`.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main(argv: list[str] | None = None) -> None:
    from machine import describe, paired_setup

    args, params, w = paired_setup(__doc__, "vllm_{change}", 8, argv, {"--change": dict(choices=("norms", "sampler"),
                                                                                        default="norms")})
    import numpy as np

    from stages.io import write_json, write_text
    from stages.logprobs import sequence_logprobs
    from stages.loop import steps
    from stages.loop.resume import round_prompts
    from stages.sample.vllm_backend import CPU_NORM_PROVIDER, topk_topp_sampler
    from stages.score import completion_inputs

    if getattr(w.sampler, "name", "") != "vllm":
        sys.exit("vllm_norms: the sampler is not vLLM here (sample.backend resolved to another)")
    from vllm import ir

    ops = (ir.ops.rms_norm, ir.ops.fused_add_rms_norm)
    if args.change == "norms" and any(op.get_priority()[:1] != [CPU_NORM_PROVIDER] for op in ops):
        sys.exit(f"vllm_norms: the engine does not run the compiled norms ({[op.get_priority() for op in ops]}): "
                 "not a CPU engine, or not an in-process eager one")
    if args.change == "sampler" and not w.sampler.inverse_cdf:
        sys.exit("vllm_norms: the engine does not draw with inverse_cdf_draw: not a CPU engine, or not an in-process one")

    def native():
        stack = contextlib.ExitStack()
        for op in ops:
            stack.enter_context(op.set_priority(["native"]))
        return stack

    @contextlib.contextmanager
    def gumbel():
        tks = w.sampler.llm.collective_rpc(topk_topp_sampler)[0]  # (the engine is in this process: the object itself)
        ours, tks.forward = tks.forward, tks.forward_cpu
        try:
            yield
        finally:
            tks.forward = ours

    arms = ({"kernel": contextlib.nullcontext, "native": native} if args.change == "norms"
            else {"inverse_cdf": contextlib.nullcontext, "gumbel": gumbel})
    new, old = arms
    rows = {a: [] for a in arms}
    try:
        for pair in range(args.rounds + 1):
            prompts = round_prompts(w.train_prompts, pair, params.train.prompts_per_round, params.base.seed)
            for arm in (new, old) if pair % 2 == 0 else (old, new):
                w.sampler.llm.reset_prefix_cache()  # else the second arm would reuse the first's prompt blocks
                with arms[arm]():
                    t0 = time.perf_counter()
                    samples, _ = steps.sample_round(w, pair, prompts, logprobs=True)  # compared below
                    secs = time.perf_counter() - t0
                p_ids, c_ids = completion_inputs(samples, w.tokenizer)
                exact, _ = sequence_logprobs(w.trainer.model, p_ids, c_ids, w.tokenizer.pad_token_id, len(c_ids),
                                             dtype="float32")
                engine = np.array([sum(x) for x in samples["sampler_logprobs"]])
                err = float(np.abs(engine - np.asarray(exact)).mean())
                print(f"pair {pair} {arm}: sampling {secs:.2f} s, engine logprobs vs an fp32 pass: {err:.3f} nats "
                      "per sequence", flush=True)
                if pair >= 1:
                    rows[arm].append({"pair": pair, "sampling_s": secs, "logprob_abs_err": err})
    finally:
        w.sampler.close()

    med = {a: {k: statistics.median(x[k] for x in v) for k in ("sampling_s", "logprob_abs_err")}
           for a, v in rows.items()}
    machine = describe()
    ratio = statistics.median(k["sampling_s"] / n["sampling_s"] for k, n in zip(rows[new], rows[old]))
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "sample_dtype": str(w.sampler.dtype),
              "change": args.change, "medians": med, f"{new}_over_{old}_median_of_pairs": ratio, "pairs": rows}
    write_json(result, Path(args.out + ".json"))
    lines = [f"{result['date']}, {machine}; vLLM engine {str(w.sampler.dtype).removeprefix('torch.')}, "
             f"{params.train.prompts_per_round} prompts x K={params.sample.k} x {params.sample.max_completion_length} "
             f"tokens a round; {args.rounds} pairs, each round's prompts and seeds sampled with both ({args.change}), "
             "the order alternating, the prefix cache emptied before each (a warm-up pair left out).", "",
             f"| {'RMSNorm' if args.change == 'norms' else 'draw'} | sampling s (median) | each pair | engine logprob vs "
             "fp32 pass, mean \\|error\\| a sequence (median; each pair) |",
             "|---|---|---|---|"]
    for a, v in rows.items():
        lines.append(f"| {a} | {med[a]['sampling_s']:.2f} | {', '.join('%.2f' % x['sampling_s'] for x in v)} | "
                     f"{med[a]['logprob_abs_err']:.3f} ({', '.join('%.2f' % x['logprob_abs_err'] for x in v)}) |")
    lines += ["", f"{new} / {old}, the median of the pairs' ratios: {ratio:.2f}x the time"]
    write_text("\n".join(lines) + "\n", Path(args.out + ".md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
