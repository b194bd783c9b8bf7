"""Grouped-query attention without K/V copies (the default, `stages.attention`) against transformers' eager
attention, on the trainer and the reference of the default task, in pairs in one process.

Each pair samples one round (params.yaml: prompts_per_round x K completions) once and runs its scoring step (the
reference pass and the update's forward) and its update with both attentions, the order alternating from pair to
pair; the first pair warms up and is left out. Both arms update the same policy (a pair applies two updates on its
round's samples: a timing run, not a training run). Before any update, the reference's and the policy's sequence
logprobs of the first round under both attentions are compared: the largest |difference| per sequence.

    python benchmarks/attention.py [--rounds 6] [--out benchmarks/results/attention]

Writes OUT.json and OUT.md (medians, each pair's times, the machine). Needs `dvc repro prepare`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main(argv: list[str] | None = None) -> None:
    from machine import describe, paired_setup

    args, params, w = paired_setup(__doc__, "attention", 6, argv)
    from stages.attention import NAME
    from stages.io import write_json, write_text
    from stages.logprobs import sequence_logprobs
    from stages.loop import steps
    from stages.loop.resume import round_prompts
    from stages.score import completion_inputs, score_dtype

    # the rounds' reference pass runs on the reference's bf16 view where the run keeps one (steps.scoring_reference)
    models = (w.trainer.model, w.ref, *((w.ref_bf16,) if w.ref_bf16 is not None else ()))
    if any(m.config._attn_implementation != NAME for m in models):
        sys.exit("attention: the models do not run the grouped attention (not Llama's eager attention code)")
    impl = {"grouped": NAME, "eager": "eager"}
    dtype = score_dtype(params.score.dtype)

    def use(arm: str) -> None:
        for m in models:
            m.set_attn_implementation(impl[arm])

    rows = {a: [] for a in impl}
    diffs = {}
    try:
        for pair in range(args.rounds + 1):
            prompts = round_prompts(w.train_prompts, pair, params.train.prompts_per_round, params.base.seed)
            samples, _ = steps.sample_round(w, pair, prompts)
            if pair == 0:
                p_ids, c_ids = completion_inputs(samples, w.tokenizer)
                for name, model in (("reference", steps.scoring_reference(w)), ("policy", w.trainer.model)):
                    got = {}
                    for arm in impl:
                        use(arm)
                        got[arm], _ = sequence_logprobs(model, p_ids, c_ids, w.tokenizer.pad_token_id, len(c_ids),
                                                        dtype=dtype)
                    diffs[name] = max(abs(a - b) for a, b in zip(got["grouped"], got["eager"]))
                print(f"sequence logprobs, grouped vs eager, max |diff|: {diffs}", flush=True)
            for arm in ("grouped", "eager") if pair % 2 == 0 else ("eager", "grouped"):
                use(arm)
                t0 = time.perf_counter()
                scores, _ = steps.score_round(w, samples)
                t_score = time.perf_counter() - t0
                advs, w.adv_state, _ = steps.advantage_round(w, scores)
                t0 = time.perf_counter()
                steps.update_round(w, samples, advs)
                steps.sync_sampler(w)  # the push, timed with the update as before it moved to the engine's next use
                t_update = time.perf_counter() - t0
                print(f"pair {pair} {arm}: scoring {t_score:.2f} s, update {t_update:.2f} s", flush=True)
                if pair >= 1:
                    rows[arm].append({"pair": pair, "scoring_s": t_score, "update_s": t_update,
                                      "both_s": t_score + t_update})
    finally:
        use("grouped")
        w.sampler.close()

    keys = ("scoring_s", "update_s", "both_s")
    med = {a: {k: statistics.median(x[k] for x in v) for k in keys} for a, v in rows.items()}
    ratio = statistics.median(g["both_s"] / e["both_s"] for g, e in zip(rows["grouped"], rows["eager"]))
    machine = describe()
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "score_dtype": dtype,
              "medians": med, "grouped_over_eager_median_of_pairs": ratio, "logprob_max_abs_diff": diffs,
              "pairs": rows}
    write_json(result, Path(args.out + ".json"))
    lines = [f"{result['date']}, {machine}; scoring passes {result['score_dtype']}, "
             f"{params.train.prompts_per_round} prompts x K={params.sample.k} x {params.sample.max_completion_length} "
             f"tokens a round; {args.rounds} pairs, each round's scoring step and update run with both attentions on "
             "its samples, the order alternating (a warm-up pair left out).", "",
             "| attention | scoring s (median) | update s (median) | both (median) | each pair's both |",
             "|---|---|---|---|---|"]
    for a, v in rows.items():
        lines.append(f"| {a} | {med[a]['scoring_s']:.2f} | {med[a]['update_s']:.2f} | {med[a]['both_s']:.2f} | "
                     f"{', '.join('%.2f' % x['both_s'] for x in v)} |")
    lines += ["", f"grouped / eager, the median of the pairs' ratios: {ratio:.2f}x the time",
              f"sequence logprobs of the first round, grouped vs eager, max |difference|: reference "
              f"{diffs['reference']:.2g}, policy {diffs['policy']:.2g} nats"]
    write_text("\n".join(lines) + "\n", Path(args.out + ".md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
