"""Ours and TRL's RLOOTrainer trained on the same samples: does the pipeline's round (reward, KL, leave-one-out
advantage, loss, clipping, AdamW step) move the weights exactly as TRL's step does?

The comparison of held-out rewards (benchmarks/bench_trl.py) mixes two sources of difference: each arm's sampler
draws its own completions, and each arm's training step. This check takes the sampler out: the flow's warm loop
runs `--rounds` rounds of the default task (the weight push, vLLM sampling, scoring, advantages, update), saving each
round's samples; then TRL's RLOOTrainer, configured as the comparison configures it (bench_trl.trl_config), trains
for as many steps with its generation replaced by those very completions (token ids, in the same order). Reported:
each step's advantages against ours, the gradient norms before clipping, and the final weights' change from the
base model, ours against TRL's (relative distance and cosine). Equal steps leave only float rounding (1e-4);
a different reward, KL, baseline, loss normalisation or optimizer shows up as an O(1) distance.

    python benchmarks/trl_replay.py [--rounds 3]

Needs models/base and data/prepared (`dvc repro prepare`) and the `bench` extra (trl). Each side runs in its own
process. Writes benchmarks/results/trl_replay.json and .md (~6 min on 2 AVX2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"


def run_ours(work: Path, rounds: int) -> dict:
    """The flow's round steps over a warm loop (docs/design.md §3), each round's samples and advantages saved."""
    import torch

    from stages.loop.resume import round_prompts
    from stages.loop.steps import advantage_round, sample_round, score_round, update_round
    from stages.loop.warm import load_warm
    from stages.params import load_params
    from stages.runtime import configure_env

    params = load_params(ROOT / "params.yaml")
    configure_env(params.base.threads)
    w = load_warm(params, rounds)
    grad_norms = []
    for r in range(rounds):
        prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed)
        samples, _ = sample_round(w, r, prompts)
        scores, _ = score_round(w, samples)
        advs, w.adv_state, _ = advantage_round(w, scores)
        grad_norms.append(update_round(w, samples, advs)["grad_norm"])
        samples.write_parquet(work / f"samples{r}.parquet")
        advs.write_parquet(work / f"advantages{r}.parquet")
    torch.save({k: v.detach().clone() for k, v in w.trainer.model.state_dict().items()}, work / "ours.pt")
    return {"grad_norms": grad_norms}


def run_trl(work: Path, rounds: int) -> dict:
    """TRL's RLOOTrainer whose `_generate` hands back ours' completions of each prompt, in order."""
    import polars as pl
    import torch
    from bench_trl import trl_config, trl_reward
    from datasets import Dataset
    from trl import RLOOTrainer

    from stages.io import read_table
    from stages.models import load_tokenizer
    from stages.params import load_params
    from stages.runtime import configure_env, update_autocast
    from stages.schemas import PROMPTS

    params = load_params(ROOT / "params.yaml")
    configure_env(params.base.threads)
    tok = load_tokenizer(params.base.model_dir)
    row = {r["prompt_id"]: r for r in read_table("data/prepared/train.parquet", PROMPTS).iter_rows(named=True)}
    texts, by_text, queue = [], {}, {}
    for r in range(rounds):
        df = pl.read_parquet(work / f"samples{r}.parquet")
        for s in df.iter_rows(named=True):
            if (r, s["prompt_text"]) not in queue:
                texts.append(s["prompt_text"])
            by_text[s["prompt_text"]] = row[s["prompt_id"]]
            queue.setdefault((r, s["prompt_text"]), []).append(list(s["completion_token_ids"]))
    step, rows, advantages = [0], [], []

    class Replay(RLOOTrainer):
        def _generate(self, prompts):  # TRL's batch: each prompt K times in a row, the round's prompts in order
            prompt_ids, _, _ = self._tokenize_prompts(prompts)
            completion_ids = [queue[(step[0], p)].pop(0) for p in prompts]
            step[0] += 1
            rows.append([[p, ids] for p, ids in zip(prompts, completion_ids, strict=True)])  # the advantages' keys
            return prompt_ids, completion_ids, self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            advantages.append(out["advantages"].tolist())
            return out

    bf16 = update_autocast(params.update.bf16_autocast)  # as the comparison runs TRL: ours' update precision
    trainer = Replay(model=params.base.model_dir, reward_funcs=[trl_reward(params, by_text)],
                     args=trl_config(params, rounds, work / "trl-out", bf16=bf16),
                     train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok)
    trainer.train()
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, work / "trl.pt")
    return {"grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
            "advantages": advantages, "rows": rows}


def advantage_gap(ours, trl_rows: list, trl_advantages: list[float]) -> float:
    """The largest |ours - TRL| advantage of one step, each completion matched by (prompt text, token ids), not
    by row position (equal completions of a prompt have equal rewards, so their order does not matter). Raises
    when the two steps did not train on the same completions."""
    def keyed(keys, values):
        out: dict = {}
        for (text, ids), v in zip(keys, values, strict=True):
            out.setdefault((text, tuple(ids)), []).append(float(v))
        return {k: sorted(v) for k, v in out.items()}

    mine = keyed(zip(ours["prompt_text"], ours["completion_token_ids"], strict=True), ours["advantage"])
    theirs = keyed(trl_rows, trl_advantages)
    if mine.keys() != theirs.keys() or any(len(mine[k]) != len(theirs[k]) for k in mine):
        raise RuntimeError("TRL's step did not train on ours' completions (the replay lost its pairing)")
    return max(abs(a - b) for k in mine for a, b in zip(mine[k], theirs[k], strict=True))


def compare(work: Path, rounds: int, ours: dict, trl: dict) -> dict:
    import polars as pl
    import torch
    from safetensors.torch import load_file

    base = {}
    for f in sorted((ROOT / "models" / "base").glob("*.safetensors")):
        base |= load_file(f)
    o = torch.load(work / "ours.pt", weights_only=True)
    t = torch.load(work / "trl.pt", weights_only=True)
    names = [k for k in o if k in t and k in base]
    dd = do = dt = dot = 0.0
    worst = []
    for k in names:
        a, b = o[k].float() - base[k].float(), t[k].float() - base[k].float()
        dd += float((a - b).pow(2).sum())
        do += float(a.pow(2).sum())
        dt += float(b.pow(2).sum())
        dot += float((a * b).sum())
        worst.append((float((a - b).norm() / a.norm().clamp(min=1e-30)), k))
    adv = [advantage_gap(pl.read_parquet(work / f"advantages{r}.parquet").join(
        pl.read_parquet(work / f"samples{r}.parquet").select("prompt_id", "sample_idx", "prompt_text",
                                                             "completion_token_ids"),
        on=["prompt_id", "sample_idx"], how="inner", validate="1:1").to_dict(as_series=False),
        trl["rows"][r], trl["advantages"][r]) for r in range(rounds)]
    return {"tensors": len(names), "missing": sorted(set(o) ^ set(t)), "rel_distance": math.sqrt(dd / do),
            "norm_ratio": math.sqrt(dt / do), "cosine": dot / math.sqrt(do * dt), "worst": sorted(worst)[-3:][::-1],
            "max_advantage_diff": adv, "grad_norms_ours": ours["grad_norms"], "grad_norms_trl": trl["grad_norms"]}


def markdown(res: dict) -> str:
    from machine import describe

    c = res["compare"]
    gn = ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(c["grad_norms_ours"], c["grad_norms_trl"], strict=True))
    return "\n".join([
        f"{res['date']}, {describe()}; default params.yaml, {res['rounds']} rounds.", "",
        f"**Same samples, same update.** The flow's warm loop ran {res['rounds']} rounds (vLLM sampling, scoring, "
        "leave-one-out advantages, update, weight push); TRL's RLOOTrainer (bench_trl's settings) then trained "
        f"{res['rounds']} steps on those very completions.", "",
        "| | ours against TRL |", "|---|---|",
        f"| advantages, max \\|difference\\| per step | {', '.join(f'{x:.1e}' for x in c['max_advantage_diff'])} |",
        f"| gradient norm before clipping, per step (ours / TRL) | {gn} |",
        f"| weight change from the base, \\|d_ours - d_TRL\\| / \\|d_ours\\| | {c['rel_distance']:.1e} |",
        f"| \\|d_TRL\\| / \\|d_ours\\|, cosine | {c['norm_ratio']:.6f}, {c['cosine']:.8f} |",
        "| worst tensors (relative distance) | " + ", ".join(f"{n} {r:.1e}" for r, n in c["worst"]) + " |",
        f"| tensors compared | {c['tensors']}" + (f" (not in both: {c['missing']})" if c["missing"] else "") + " |",
        "", "Equal steps leave float rounding only; a held-out difference between the arms then comes from the "
        "samplers' draws.", ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of ours, then as many TRL steps on their samples")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run = run_ours if args.worker == "ours" else run_trl
        print(json.dumps(run(Path(args.work), args.rounds)), flush=True)
        return

    from machine import require_prepared

    from stages.errors import PipelineError
    from stages.io import write_json, write_text

    if args.rounds < 1:
        raise PipelineError("--rounds: at least 1")
    require_prepared(ROOT)
    try:
        import trl  # noqa: F401
    except ImportError as e:
        raise PipelineError("trl is not installed; install the bench extra (`make .venv/.bench-installed`)") from e
    res = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="trl-replay-") as tmp:
        for side in ("ours", "trl"):
            print(f"[{time.strftime('%H:%M:%S')}] {side}: {args.rounds} rounds ...", flush=True)
            p = subprocess.run([sys.executable, __file__, "--worker", side, "--work", tmp, "--rounds", str(args.rounds)],
                               cwd=ROOT, capture_output=True, text=True)
            if p.returncode != 0:
                raise PipelineError(f"{side} side failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}")
            res[side] = json.loads(p.stdout.strip().splitlines()[-1])
        res["compare"] = compare(Path(tmp), args.rounds, res["ours"], res["trl"])
    for bulky in ("advantages", "rows"):  # compared above; the JSON keeps the comparison, not every completion
        res["trl"].pop(bulky, None)
    out = Path(args.out)
    write_json(res, out / "trl_replay.json")
    md = markdown(res)
    write_text(md, out / "trl_replay.md")
    print(md)


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    from stages.errors import run_cli

    run_cli(main)
