"""Roofline of a round: every phase's work, time, achieved rate and share of this machine's peak in its dtype.

For each phase of a round of the default task (params.yaml), run warm with the loop's own functions:

| phase | work counted | rate | peak it is held to |
|---|---|---|---|
| sample | generated tokens; 2 x params FLOPs per processed token | tokens/s | vLLM's best tokens/s on this CPU (measured here, batch sweep) |
| reward | completions | completions/s | - |
| policy / reference logprobs | 2 x (non-embedding params x tokens + lm_head x completion tokens) | GFLOP/s | matmul peak in the pass's dtype |
| update | 3 x the forward FLOPs (forward + backward; see below) | GFLOP/s | matmul peak in the autocast dtype |
| weight sync, writes | bytes moved | GB/s | - |

Where the update's forward gives the KL its policy logprobs (`score.policy_logprobs`: update/auto), the policy
row is that forward (timed inside the score step) and the update row its backward (2 x the forward FLOPs).

The matmul peak is measured in the same run (the best of a few GEMM shapes the model uses, all cores). Phases are
timed one by one (the flow runs them in this order too); the writes are the round's three Parquet artifacts, its
manifest and a checkpoint.

Why a torch pass is where it is: on a CPU one more round runs after the timed ones with each torch pass (policy
logprobs, reference logprobs, update) under torch.profiler, and a second table splits its time into its matmuls
(`aten::mm`/`addmm`/`bmm`/`baddbmm`, their FLOPs from the recorded shapes: the rate they reach at the pass's own
shapes), the other ops (casts, elementwise, softmax, the optimizer; the largest named) and the Python between ops.
The profiler adds a few microseconds an op, so that round is not in the means.

    python benchmarks/roofline.py [--rounds 4] [--params params.yaml] [--out DIR]
    python benchmarks/roofline.py --render [--out DIR]     # rewrite DIR/roofline.md from DIR/roofline.json

Writes benchmarks/results/roofline.json and roofline.md. Needs `dvc repro prepare` (models/base, data/prepared).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"


# the rounds left out of the table: the first pays the one-time costs (the first update, the engine's first calls),
# the second still grows the process into new memory (AdamW's moments take what the first forward's activations
# used; benchmarks/results/xeon-amx-draw/first_rounds.txt)
SETTLE = 2


def settled(meta: dict, rows: list) -> list:
    """The rounds the table is the mean of: those after the first `settle_rounds` (1 in files without it, written
    before this change), or all where there are no more."""
    return rows[meta.get("settle_rounds", 1):] or rows


def matmul_peak(dtype_name: str, seconds: float = 2.0) -> float:
    """Best GFLOP/s of torch.matmul over a few shapes of this model's GEMMs (tokens x 576 x 1536, ...)."""
    import torch

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def model_sizes(model) -> tuple[int, int]:
    """(non-embedding parameters, lm_head parameters): what a token costs in a forward pass, per position."""
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return total - emb, emb  # tied lm_head: the embedding matrix is used once more, at the positions that need logits


def forward_flops(prompts, completions, nonemb: int, head: int, share: bool) -> float:
    """Matmul FLOPs of one forward pass over the round (shared prompts counted once when `share`): the lm_head at
    each completion token's predicting position only, as `stages.logprobs` runs it (padding not counted)."""
    prompt_tokens = sum(len(p) for p in {tuple(p) for p in prompts}) if share else sum(len(p) for p in prompts)
    completion_tokens = sum(len(c) for c in completions)
    return 2.0 * (nonemb * (prompt_tokens + completion_tokens) + head * completion_tokens)


def vllm_best_rate(w, prompts_df, params) -> dict:
    """vLLM's generated tokens/s at growing batch sizes (same prompts, K completions), to find its best here; with
    logprobs asked for exactly where the rounds ask for them (`steps.round_uses_sampler_logprobs`)."""
    from stages.loop.steps import round_uses_sampler_logprobs
    from stages.sample import generation_config, sample_prompts

    cfg = generation_config(params.sample, logprobs=round_uses_sampler_logprobs(w))
    out = {}
    for n in (8, 16, 32, 64):
        batch = prompts_df.head(n)
        _, s = sample_prompts(w.sampler, w.tokenizer, batch, cfg, params.base.seed, 999, 0, params.sample.max_model_len)
        out[n * cfg.k] = s["sample/tokens_per_s"]
    return out


def update_passes(forward_at_scoring: bool) -> int:
    """The update's work in forwards: forward + backward (~2 forwards), or the backward alone where its forward ran
    at scoring time, as the policy's logprobs (`score.policy_logprobs`: update/auto)."""
    return 2 if forward_at_scoring else 3


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_flops(op: str, shapes: list) -> float:
    """FLOPs of one call of a matmul op from its inputs' shapes (torch.profiler's `record_shapes`): 2 m k n, times
    the batch for the batched ones; `addmm`/`baddbmm` take the added term first."""
    a, b = shapes[1:3] if op in ("aten::addmm", "aten::baddbmm") else shapes[:2]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def op_breakdown(prof, wall_s: float, top: int = 3) -> dict:
    """A profiled pass's time by kind (`prof`: a finished torch.profiler.profile with record_shapes): its matmuls'
    seconds, calls and FLOPs; every other op's seconds and calls, the `top` largest named; and the wall time outside
    any op (the Python between them). Self CPU times, so nested ops' seconds count once (a custom autograd
    Function's own Python is one of the other ops); the calls are the profiler's events, nested ones included."""
    mm_s = mm_flops = other_s = 0.0
    mm_calls = other_calls = 0
    others: dict[str, list] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        self_s = e.self_cpu_time_total / 1e6
        if e.key in MATMULS:
            mm_s, mm_calls = mm_s + self_s, mm_calls + e.count
            mm_flops += e.count * matmul_flops(e.key, e.input_shapes)
        else:
            other_s, other_calls = other_s + self_s, other_calls + e.count
            agg = others.setdefault(e.key, [0.0, 0])
            agg[0], agg[1] = agg[0] + self_s, agg[1] + e.count
    largest = sorted(others.items(), key=lambda kv: -kv[1][0])[:top]
    return {"wall_s": wall_s, "matmul_s": mm_s, "matmul_calls": mm_calls, "matmul_flops": mm_flops,
            "other_s": other_s, "other_calls": other_calls, "outside_s": max(wall_s - mm_s - other_s, 0.0),
            "largest_other": [[k, v[0], v[1]] for k, v in largest]}


def logprob_passes(w, samples, inputs: tuple, source: str, batch_size: int, score_dtype) -> dict:
    """The round's logprob passes outside the update, as the flow's score step runs them, by name, each a call that
    the timed rounds time and the profiled round profiles: the policy's own pass where its logprobs come from the
    trainer (`score.policy_logprobs`), and the reference's (its bf16 view on a CPU), batched as the update's forward
    (the whole round) where that forward gives the policy's logprobs, else by `score.batch_size`. `inputs`: the
    round's (prompt ids, completion ids), `stages.score.completion_inputs`."""
    from stages.logprobs import sequence_logprobs
    from stages.loop import steps

    p_ids, c_ids = inputs
    pad, share = w.tokenizer.pad_token_id, w.params.base.share_prompts
    passes = {}
    if source == "trainer":
        passes["policy logprobs"] = lambda: sequence_logprobs(w.trainer.model, p_ids, c_ids, pad, batch_size,
                                                              share=share, dtype=score_dtype)
    passes["reference logprobs"] = lambda: sequence_logprobs(
        steps.scoring_reference(w), p_ids, c_ids, pad, samples.height if source == "update" else batch_size,
        share=share, dtype=score_dtype)
    return passes


def profiled(fn) -> tuple[object, dict]:
    """`fn()` under torch.profiler (CPU ops, their shapes): its result and `op_breakdown`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    return out, op_breakdown(prof, wall)


def render_breakdown(meta: dict, breakdown: dict) -> list[str]:
    """The roofline's second table: where each profiled torch pass's time goes."""
    peaks = meta["peaks_gflops"]
    lines = ["", "Where the torch passes' time goes (one more round, each pass under torch.profiler, which slows each "
             "op a little; not in the means above):", "",
             "| pass | dtype | seconds | matmuls | their rate at the pass's shapes | other ops | largest other ops | "
             "between ops (Python) |", "|---|---|---|---|---|---|---|---|"]
    for name, b in breakdown.items():
        wall, dtype = b["wall_s"], b["dtype"]
        rate = b["matmul_flops"] / b["matmul_s"] / 1e9 if b["matmul_s"] else 0.0
        share = f" ({100 * rate / peaks[dtype]:.0f} % of {dtype} peak)" if dtype in peaks else ""
        largest = ", ".join(f"{k.removeprefix('aten::')} {s:.2f} s" for k, s, _ in b["largest_other"])
        lines.append(f"| {name} | {dtype} | {wall:.2f} | {b['matmul_s']:.2f} s ({100 * b['matmul_s'] / wall:.0f} %), "
                     f"{b['matmul_calls']} calls | {rate:.0f} GFLOP/s{share} | {b['other_s']:.2f} s "
                     f"({100 * b['other_s'] / wall:.0f} %), {b['other_calls']} calls | {largest} | "
                     f"{b['outside_s']:.2f} s ({100 * b['outside_s'] / wall:.0f} %) |")
    return lines


def floor_s(meta: dict, rows: list[dict], table: list) -> dict:
    """The round at this machine's peaks: each compute phase's work at 100 % of the peak it is held to (sampling at
    vLLM's best tokens/s, the logprob passes and the update at the matmul peak of their dtype), the other phases as
    measured. Where this floor is above a target, no tuning of kernels reaches it; only less work or a lower precision
    does."""
    last = settled(meta, rows)
    fwd = sum(x["fwd_flops"] for x in last) / len(last)
    gen = sum(x["generated"] for x in last) / len(last)
    peaks, best = meta["peaks_gflops"], max(meta["vllm_rate_by_batch"].values())
    by_name = {r[0]: r for r in table}
    floor = {"sample": gen / best}
    for name in ("policy logprobs", "reference logprobs", "update"):
        row = by_name[name]
        if row[1] in peaks:
            passes = update_passes(meta.get("update_forward_at_scoring", False)) if name == "update" else 1
            floor[name] = passes * fwd / (peaks[row[1]] * 1e9)
    rest = sum(r[3] for r in table if r[0] not in floor)
    return {"compute": sum(floor.values()), "rest": rest, "round": sum(floor.values()) + rest, "by_phase": floor}


def render(meta: dict, rows: list[dict], table: list, breakdown: dict | None = None) -> str:
    """The roofline's Markdown from what roofline.json holds (`--render` rewrites it without measuring again); the
    passes' `breakdown` where it was profiled (files from before it have none)."""
    from machine import params_name, stamp

    peaks, best, total = meta["peaks_gflops"], meta["vllm_rate_by_batch"], meta["round_s"]
    last = settled(meta, rows)
    settle = len(rows) - len(last)
    what = (f"{len(last)} round(s), none left out" if not settle else
            f"{len(last)} warm round(s) after the first" + (f" {settle}" if settle > 1 else ""))
    lines = [f"{stamp(meta)}; {params_name(meta.get('params', 'params.yaml'))}, {what} "
             f"(means). Matmul peak measured in the same run: fp32 {peaks['float32']:.0f}, bf16 "
             f"{peaks['bfloat16']:.0f} GFLOP/s; vLLM tokens/s by batch (sequences): "
             + ", ".join(f"{k}: {v:.0f}" for k, v in best.items()) + ".", "",
             "| phase | dtype | work | seconds | rate | share of peak |", "|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d:.2f} ({100 * d / total:.0f} %) | {e} | {f} |" for a, b, c, d, e, f in table]
    lines.append(f"| **round** | | | **{total:.2f}** | | |")
    f = floor_s(meta, rows, table)
    lines += ["", f"**Floor at this machine's peaks: {f['round']:.2f} s a round** ("
              + ", ".join(f"{k} {v:.2f}" for k, v in f["by_phase"].items())
              + f" s at 100 % of their peaks, {f['rest']:.2f} s of the other phases as measured); the measured round "
              f"is {total / f['round']:.2f}x its floor. {f['compute']:.2f} s of compute at peak is the least a round "
              "of this work and precision takes here."]
    if breakdown:
        lines += render_breakdown(meta, breakdown)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from stages.runtime import preload_malloc

    if argv is None:  # with the malloc the training command runs with (tcmalloc where installed)
        preload_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=SETTLE + 2,
                    help=f"rounds run (more than {SETTLE}); the table is the mean of those after the first {SETTLE}")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", action="store_true", help="rewrite roofline.md from --out's roofline.json, no run")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.render:
        import json

        from stages.io import write_text

        src = Path(args.out) / "roofline.json"
        if not src.is_file():
            ap.error(f"--render: no {src}; run the benchmark with --out {args.out} first")
        data = json.loads(src.read_text())
        md = render(data["meta"], data["rounds"], data["table"], data.get("breakdown"))
        write_text(md, Path(args.out) / "roofline.md")
        print(md)
        return
    if args.rounds <= SETTLE:
        ap.error(f"--rounds: {args.rounds} leaves no round to measure; use more than {SETTLE} (the first {SETTLE} are "
                 "left out of the table)")

    from machine import code_version, describe

    from stages.io import write_json, write_text
    from stages.loop import steps
    from stages.loop.resume import round_prompts
    from stages.loop.warm import load_warm
    from stages.loop.writer import manifest_for, round_write, write_artifact
    from stages.params import load_params
    from stages.rewards import combine, compute_rewards
    from stages.runtime import configure_env, sampler_dtype, update_autocast
    from stages.runtime import score_dtype as resolve_score_dtype
    from stages.schemas import ADVANTAGES, SAMPLES, SCORES
    from stages.score import completion_inputs, reward_inputs

    params = load_params(args.params)
    configure_env(params.base.threads)
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    print(f"matmul peak: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s", flush=True)
    w = load_warm(params, args.rounds + 1)  # the timed rounds, then one profiled (on a CPU)
    nonemb, head = model_sizes(w.trainer.model)
    sample_dtype = sampler_dtype(params.sample.dtype, params.score)
    update_dtype = "bfloat16" if update_autocast(params.update.bf16_autocast) else "float32"
    score_dtype = resolve_score_dtype(params.score.dtype)
    share = params.base.share_prompts
    rows, ahead_rounds, sampler_rounds = [], 0, 0
    work = Path(tempfile.mkdtemp(prefix="roofline-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # ~1.6 GB of checkpoints; kept only while this runs
    tp = params.train.model_copy(update={"checkpoint_dir": str(work / "policy"), "state_dir": str(work / "state")})
    wparams = params.model_copy(update={"train": tp})
    try:
        for r in range(args.rounds):
            t = {}
            prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed)
            t0 = time.perf_counter()
            samples, s_stats = steps.sample_round(w, r, prompts)
            t["sample"] = time.perf_counter() - t0
            p_ids, c_ids = completion_inputs(samples, w.tokenizer)
            t0 = time.perf_counter()
            keys = list(zip(samples["prompt_id"], samples["sample_idx"]))
            texts, columns = reward_inputs(samples, w.train_prompts)
            combine(compute_rewards(w.rewards, texts, samples["completion"].to_list(), keys, None, **columns),
                    {x.name: x.weight for x in w.rewards})
            t["reward"] = time.perf_counter() - t0
            # the update's forward gives the policy's logprobs (score.policy_logprobs: auto/update): no policy
            # pass; the reference pass batches as that forward (the whole round), as the flow's does
            source = steps.policy_logprobs_for(w, samples.height)
            ahead = source == "update"
            ahead_rounds, sampler_rounds = ahead_rounds + ahead, sampler_rounds + (source == "sampler")
            t["policy logprobs"] = 0.0  # the flow skips it when the sampler's logprobs are the policy's (fp32)
            for name, run in logprob_passes(w, samples, (p_ids, c_ids), source, params.score.batch_size,
                                            score_dtype).items():
                t0 = time.perf_counter()
                run()
                t[name] = time.perf_counter() - t0
            scores, sc = steps.score_round(w, samples)  # the step itself, for the advantages (not timed here)
            if ahead:  # the update's forward, run inside it and kept for the update: the update is then its backward
                t["policy logprobs"] = sc["time/policy_forward_s"]
            advs, w.adv_state, _ = steps.advantage_round(w, scores)
            u = steps.update_round(w, samples, advs)
            t["update"] = u["time/update_s"]
            t["weight sync"] = steps.sync_sampler(w)  # (else the next round's sampling pushes them, in its time)
            t0 = time.perf_counter()
            d = work / f"round={r:04d}"
            recs = {f"{n}.parquet": write_artifact(df, d, n, sch) for n, df, sch in
                    (("samples", samples, SAMPLES), ("scores", scores, SCORES), ("advantages", advs, ADVANTAGES))}
            t["writes (Parquet)"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            round_write(w.trainer, wparams, manifest_for(r, "bench", "bench", recs, {}, w.adv_state, None),
                        d / "manifest.json", True)()
            t["writes (checkpoint + manifest)"] = time.perf_counter() - t0
            fwd = forward_flops(p_ids, c_ids, nonemb, head, share)
            gen = int(samples["num_tokens"].sum())
            rows.append({"round": r + 1, "times": t, "fwd_flops": fwd, "generated": gen,
                         "completions": samples.height, "tokens": sum(len(p) + len(c) for p, c in zip(p_ids, c_ids))})
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
        breakdown = {}
        if w.device.type == "cpu":  # one more round, its torch passes profiled (CPU ops: not a GPU's kernels)
            r = args.rounds
            prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed)
            samples, _ = steps.sample_round(w, r, prompts)
            scores, _ = steps.score_round(w, samples)
            advs, w.adv_state, _ = steps.advantage_round(w, scores)
            source = steps.policy_logprobs_for(w, samples.height)
            if source == "update":  # the forward the update then uses (it replaces the score step's)
                _, breakdown["policy logprobs"] = profiled(lambda: w.trainer.forward_ahead(samples))
            inputs = completion_inputs(samples, w.tokenizer)
            for name, run in logprob_passes(w, samples, inputs, source, params.score.batch_size, score_dtype).items():
                _, breakdown[name] = profiled(run)
            _, breakdown["update"] = profiled(lambda: steps.update_round(w, samples, advs))
            for name in breakdown:
                breakdown[name]["dtype"] = update_dtype if name == "update" else score_dtype
            steps.sync_sampler(w)
        best = vllm_best_rate(w, w.train_prompts, params)  # (the engine has the last update's weights: synced above)
    finally:
        w.sampler.close()
    last = settled({"settle_rounds": SETTLE}, rows)  # the first rounds pay one-time costs; the table uses the later
    mean = lambda k: sum(x["times"][k] for x in last) / len(last)  # noqa: E731
    fwd = sum(x["fwd_flops"] for x in last) / len(last)
    gen = sum(x["generated"] for x in last) / len(last)
    n_compl = sum(x["completions"] for x in last) / len(last)
    best_rate = max(best.values())
    ckpt_bytes = sum(f.stat().st_size for f in (work / "policy").rglob("*") if f.is_file())
    state_bytes = sum(f.stat().st_size for f in (work / "state").rglob("*") if f.is_file())
    table = [
        ("sample", sample_dtype, f"{gen:.0f} tokens", mean("sample"), f"{gen / mean('sample'):.0f} tokens/s",
         f"{100 * gen / mean('sample') / best_rate:.0f} % of vLLM's best ({best_rate:.0f} tokens/s)"),
        ("reward", "-", f"{n_compl:.0f} completions", mean("reward"), f"{n_compl / mean('reward'):.0f} /s", "-"),
    ]
    ahead = ahead_rounds == args.rounds
    notes = {"policy logprobs": " (the update's forward)", "update": " (its backward)"} if ahead else {}
    for name, dtype, flops in (("policy logprobs", score_dtype, fwd), ("reference logprobs", score_dtype, fwd),
                               ("update", update_dtype, update_passes(ahead) * fwd)):
        if name == "policy logprobs" and sampler_rounds == args.rounds:
            table.append((name, "-", "skipped: the fp32 sampler's logprobs are the policy's", 0.0, "-", "-"))
            continue
        rate = flops / mean(name) / 1e9
        table.append((name, dtype, f"{flops / 1e12:.2f} TFLOP{notes.get(name, '')}", mean(name), f"{rate:.0f} GFLOP/s",
                      f"{100 * rate / peaks[dtype]:.0f} % of {dtype} peak ({peaks[dtype]:.0f})"))
    sync_bytes = sum(v.numel() * 2 for v in w.trainer.model.state_dict().values()) if sample_dtype != "float32" else 0
    table.append(("weight sync", sample_dtype, f"{sync_bytes / 1e9:.2f} GB" if sync_bytes else "-", mean("weight sync"),
                  f"{sync_bytes / 1e9 / mean('weight sync'):.1f} GB/s" if sync_bytes else "-", "-"))
    table.append(("writes (Parquet)", "-", "3 files", mean("writes (Parquet)"), "-", "-"))
    table.append(("writes (checkpoint + manifest)", "-", f"{(ckpt_bytes + state_bytes) / 1e9:.2f} GB",
                  mean("writes (checkpoint + manifest)"),
                  f"{(ckpt_bytes + state_bytes) / 1e9 / mean('writes (checkpoint + manifest)'):.2f} GB/s", "-"))
    total = sum(r[3] for r in table)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": describe(), "code": code_version(), "rounds": args.rounds, "params": args.params,
            "settle_rounds": SETTLE,
            "peaks_gflops": peaks, "vllm_rate_by_batch": best, "round_s": total, "update_forward_at_scoring": ahead}
    md = render(meta, rows, table, breakdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"meta": meta, "rounds": rows, "table": table, "breakdown": breakdown}, out / "roofline.json")
    write_text(md, out / "roofline.md")
    print(md)


if __name__ == "__main__":
    from stages.errors import run_cli

    run_cli(main)
