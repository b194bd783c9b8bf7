"""report: one readable report of a training run and its evaluation, as HTML and Markdown.

Reads  `data/rounds/round=NNNN/manifest.json` (complete rounds only: a round without a manifest is
       ignored; every complete round's artifacts are checked against the sizes and checksums its manifest
       recorded, and a damaged one is a one-line error) and the last complete round's `samples.parquet` +
       `advantages.parquet`; optionally
       `data/eval/eval.parquet` and `metrics/eval.json` (missing ones: the report says "no evaluation yet").
Writes `reports/report.html` (self-contained: inline CSS, plots as base64 PNG, no scripts, no external links)
       and `reports/report.md` with its plots as PNG files beside it (`reports/report_<plot>.png`).

Content: run summary; reward, KL and eval win-rate per round (eval points only for rounds whose manifest has
`eval/win_rate`, the final eval from `metrics/eval.json` as its own point); a per-round table; for a few
prompts of the last round the best and worst completion by advantage; the evaluation against the reference
(metrics and side-by-side examples). All model text is escaped.

Run: `python -m stages.report [--rounds-dir data/rounds] [--eval-dir data/eval] [--eval-metrics metrics/eval.json]
[--out-dir reports]` (after `dvc repro train`; `evaluate` is optional).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import re
from pathlib import Path

import polars as pl

from stages.errors import PipelineError, run_cli

log = logging.getLogger(__name__)
COLUMNS = [("reward", "reward", ".4f"), ("reward_std", "reward_std", ".4f"), ("kl", "kl", ".4f"),
           ("loss", "loss", ".4f"), ("entropy", "entropy", ".4f"), ("advantage_std", "advantage_std", ".4f"),
           ("mean length", "completions/mean_length", ".1f"), ("seconds", "time/round_s", ".1f")]
EVAL_COLUMNS = {"prompt_id": pl.String, "prompt_text": pl.String, "completion": pl.String, "score": pl.Float64,
                "ref_completion": pl.String, "ref_score": pl.Float64}
NO_EVAL = "No evaluation yet: run `dvc repro evaluate` (or set `train.eval_every`)."
NO_FINAL_EVAL = "No final evaluation yet: run `dvc repro evaluate`; the in-training evaluations are plotted above."


def _fmt(v, spec: str = ".4f") -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    return str(v) if isinstance(v, int) else format(v, spec)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")


def _tail(text: str, n: int = 300) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "…" + text[-n:]


# ---------------------------------------------------------------- data


def _checkpoint_round(checkpoint_dir: str | Path | None) -> int | None:
    if checkpoint_dir is None:
        return None
    from stages.checkpoint import read_meta

    try:
        return (read_meta(checkpoint_dir) or {}).get("round")
    except PipelineError:  # an unreadable checkpoint: the round's own damage is the message
        return None


def build_data(rounds_dir: str | Path, eval_dir: str | Path, eval_metrics: str | Path, n_examples: int = 3,
               checkpoint_dir: str | Path | None = None) -> dict:
    """Everything the report shows, from the run's artifacts; raises PipelineError when no round is complete.
    `checkpoint_dir`: the run's checkpoint, whose round the advice for a damaged round depends on."""
    from stages.io import read_json, read_table
    from stages.loop.resume import round_dir, scan_rounds, verify_round
    from stages.schemas import ADVANTAGES, KEYS, SAMPLES

    rounds_dir = Path(rounds_dir)
    complete = {r: m for r, (_, m) in scan_rounds(rounds_dir).items() if m is not None}
    if not complete:
        raise PipelineError(f"no complete rounds in {rounds_dir}; run `dvc repro train` first")
    for r, m in complete.items():  # the report relies on every complete round: each must be intact
        try:
            verify_round(round_dir(rounds_dir, r), m)
        except PipelineError:  # the advice depends on the checkpoint's round (re-doing a round before it cannot work)
            verify_round(round_dir(rounds_dir, r), m, checkpoint_round=_checkpoint_round(checkpoint_dir))
            raise
    manifests = [complete[r] for r in sorted(complete)]
    missing = sorted(set(range(max(complete) + 1)) - set(complete))
    if missing:  # a training run refuses this state; the report shows what is there and says what is not
        log.warning("%s: round(s) %s are missing or have no manifest, but later rounds are complete: the report "
                    "leaves them out", rounds_dir, ", ".join(str(r + 1) for r in missing))
    last, last_dir = manifests[-1], round_dir(rounds_dir, manifests[-1]["round"])
    adv = read_table(last_dir / "advantages.parquet", ADVANTAGES)
    samples = read_table(last_dir / "samples.parquet", SAMPLES).select(*KEYS, "prompt_text", "completion")
    joined = samples.join(adv.select(*KEYS, "advantage", "rlhf_reward"), on=list(KEYS)).filter(
        pl.col("rlhf_reward").is_not_null())  # an unscored completion (no reward applied) is neither best nor worst
    spread = (joined.group_by("prompt_id").agg(s=pl.col("advantage").max() - pl.col("advantage").min())
              .sort(["s", "prompt_id"], descending=[True, False]).head(n_examples))
    examples = []
    for pid in spread["prompt_id"]:
        g = joined.filter(pl.col("prompt_id") == pid).sort("advantage", "sample_idx", descending=[True, False])
        examples.append({"prompt_id": pid, "prompt": g["prompt_text"][0], "k": g.height,
                         "best": g.row(0, named=True), "worst": g.row(-1, named=True)})
    estimator = (last.get("advantage_state") or {}).get("estimator") or (adv["estimator"][0] if adv.height else None)
    evm = read_json(eval_metrics) if Path(eval_metrics).is_file() else None
    if evm is not None and evm.get("policy_version") not in (None, last["round"] + 1):
        log.warning("%s evaluates policy version %s, but the last complete round in %s is %d: it is another run's "
                    "evaluation or an earlier one (run `python -m stages.evaluate` for this run's)", eval_metrics,
                    evm.get("policy_version"), rounds_dir, last["round"] + 1)
    eval_path, eval_examples = Path(eval_dir) / "eval.parquet", []
    if eval_path.is_file():
        t = read_table(eval_path, EVAL_COLUMNS)
        t = t.filter(pl.col("score").is_finite() & pl.col("ref_score").is_finite())  # NaN: dropped (score.on_invalid)
        rows = t.sort(pl.col("score") - pl.col("ref_score"), descending=True).rows(named=True)
        picks = rows[: (n_examples + 1) // 2] + rows[len(rows) - n_examples // 2 :] if len(rows) > n_examples else rows
        eval_examples = list({r["prompt_id"]: r for r in picks}.values())
    summary = {
        "complete rounds": len(manifests), "last round": last["round"] + 1, "estimator": estimator,
        "run identity": last.get("identity"), "params hash": last.get("params_hash"),
        "samples per round": (last.get("rows") or {}).get("samples"),
        "prompts per round": samples["prompt_id"].n_unique(),
        "total seconds": sum(m["metrics"].get("time/round_s", 0.0) for m in manifests),
        "finished at": last.get("finished_at"),
        **({"missing rounds": ", ".join(str(r + 1) for r in missing)} if missing else {}),
    }
    rounds = [{"round": m["round"] + 1, **m["metrics"]} for m in manifests]
    return {"summary": summary, "rounds": rounds, "examples": examples, "eval": evm, "eval_examples": eval_examples}


# ---------------------------------------------------------------- plots


def smooth(ys: list[float], window: int = 3) -> list[float]:
    """Trailing moving average (the last `window` rounds): the trend of a noisy per-round training reward."""
    out = []
    for i in range(len(ys)):
        part = [y for y in ys[max(0, i - window + 1) : i + 1] if y == y]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def make_plots(data: dict) -> dict[str, bytes]:
    """PNG bytes per plot: reward (training, smoothed, held-out), win-rate and reward gain against the reference with
    their 95 % intervals (only when there is an evaluation), and KL."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rs, ev = data["rounds"], data["eval"] or {}
    x = [r["round"] for r in rs]
    evr = [r for r in rs if "eval/win_rate" in r]
    fx = ev.get("policy_version") or x[-1]
    out = {}
    specs = [("reward", "Reward per round"), ("win_rate", "Held-out win-rate vs reference (95 % CI)"),
             ("reward_gain", "Held-out reward gain over reference (95 % CI)"), ("kl", "KL to reference per round")]
    for key, title in specs:
        if key in ("win_rate", "reward_gain") and not evr and key not in ev:
            continue
        fig = Figure(figsize=(6.4, 3.4), dpi=100)
        ax = fig.subplots()
        if key == "reward":
            ys = [_num(r.get("reward")) for r in rs]
            ax.plot(x, ys, "o", ms=3, alpha=0.5, label="train reward (round)")
            ax.plot(x, smooth(ys), "-", lw=2, label="train reward (3-round mean)")
            if evr:
                ax.plot([r["round"] for r in evr], [_num(r.get("eval/reward")) for r in evr], "s--", ms=5,
                        label="held-out reward")
            if "ref_reward" in ev:
                ax.axhline(ev["ref_reward"], ls=":", color="gray", label="reference (held-out)")
        elif key == "kl":
            ax.plot(x, [_num(r.get("kl")) for r in rs], marker="o", ms=3, label="train KL")
            if evr:
                ax.plot([r["round"] for r in evr], [_num(r.get("eval/kl")) for r in evr], "s--", ms=5, label="held-out KL")
        else:
            if evr:
                ex = [r["round"] for r in evr]
                ax.plot(ex, [_num(r.get(f"eval/{key}")) for r in evr], "s-", ms=5, label=f"held-out {key}")
                lo = [_num(r.get(f"eval/{key}_ci95_low")) for r in evr]
                hi = [_num(r.get(f"eval/{key}_ci95_high")) for r in evr]
                ax.fill_between(ex, lo, hi, alpha=0.2, label="95 % CI")
            ax.axhline(0.5 if key == "win_rate" else 0.0, ls=":", color="gray", label="no better than the reference")
            if key == "win_rate":
                ax.set_ylim(0, 1)
        if key in ev:
            lo, hi = ev.get(f"{key}_ci95_low"), ev.get(f"{key}_ci95_high")
            ax.errorbar([fx], [ev[key]], yerr=[[ev[key] - lo], [hi - ev[key]]] if lo is not None else None, fmt="*",
                        ms=14, color="crimson", capsize=4, label="final evaluation")
        ax.set(title=title, xlabel="round", ylabel=key, xlim=(min(x) - 0.5, max(x + [fx]) + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        out[key] = buf.getvalue()
    return out


# ---------------------------------------------------------------- render


def _blocks(data: dict, plots) -> list[tuple]:
    """The report as neutral blocks: (h, level, text) (p, text) (table, header, rows) (img, name) (texts, pairs)."""
    summary = [[k, _fmt(v, ".1f")] for k, v in data["summary"].items()]
    b: list[tuple] = [("h", 1, "RLOO training report"), ("h", 2, "Run summary"), ("table", ["", "value"], summary)]
    b += [("h", 2, "Curves")] + [("img", name) for name in plots] + ([] if "win_rate" in plots else [("p", NO_EVAL)])
    rows = [[str(r["round"])] + [_fmt(r.get(k), f) for _, k, f in COLUMNS] for r in data["rounds"]]
    b += [("h", 2, "Per round"), ("table", ["round"] + [c for c, _, _ in COLUMNS], rows)]
    b.append(("h", 2, f"Best and worst completions of round {data['rounds'][-1]['round']} (by advantage)"))
    for e in data["examples"]:
        pair = [(f"{w}: advantage {r['advantage']:+.3f}, rlhf reward {r['rlhf_reward']:.3f}", r["completion"])
                for w, r in (("best", e["best"]), ("worst", e["worst"]))]
        b += [("h", 3, f"prompt {e['prompt_id']} ({e['k']} samples)"),
              ("texts", [("prompt (tail)", _tail(e["prompt"]))]), ("texts", pair)]
    b.append(("h", 2, "Evaluation against the reference"))
    ev = data["eval"]
    if ev is None and not data["eval_examples"]:
        return b + [("p", NO_FINAL_EVAL if "win_rate" in plots else NO_EVAL)]
    if ev is not None:
        spec = [("reward", "reward", "ref_reward", ".4f"), ("mean length", "mean_length", "ref_mean_length", ".1f"),
                ("distinct-2 (all completions)", "distinct_2", "ref_distinct_2", ".3f"),
                ("win rate", "win_rate", None, ".3f"), ("reward gain", "reward_gain", None, "+.4f"),
                ("KL to reference", "kl", None, ".4f"), ("prompts", "prompts", "prompts", "")]
        if ev.get("dropped"):  # score.on_invalid: drop
            spec.append(("prompts left out (NaN/inf or no reward)", "dropped", None, ""))
        table = [[n, _fmt(ev.get(p), f), _fmt(ev.get(r), f) if r else "–"] for n, p, r, f in spec]
        for name, key in (("win rate, 95 % CI", "win_rate"), ("reward gain, 95 % CI", "reward_gain")):
            if ev.get(f"{key}_ci95_low") is not None:
                table.append([name, f"[{ev[f'{key}_ci95_low']:.3f}, {ev[f'{key}_ci95_high']:.3f}]", "–"])
        version, last = ev.get("policy_version"), data["summary"]["last round"]
        which = (f"Final evaluation of policy version {_fmt(version)}." if version in (None, last) else
                 f"Evaluation of policy version {_fmt(version)}, not of this run's last round ({last}): another run's "
                 "evaluation, or an earlier one.")
        b += [("p", which),
              ("table", ["metric", "policy", "reference"], table)]
    if data["eval_examples"]:
        b.append(("p", "Side by side on held-out prompts: the largest gains over the reference, then the largest losses."))
    for r in data["eval_examples"]:
        head = f"prompt {r['prompt_id']}: policy {_fmt(r['score'], '+.3f')} vs reference {_fmt(r['ref_score'], '+.3f')}"
        b += [("h", 3, head), ("texts", [("prompt (tail)", _tail(r["prompt_text"]))]),
              ("texts", [("policy", r["completion"]), ("reference", r["ref_completion"] or "")])]
    return b


def _md(text: str) -> str:
    """Model text made inert in Markdown: HTML-escaped, Markdown punctuation backslashed, one line."""
    text = re.sub(r"([\\`*_\[\]#|~])", r"\\\1", html.escape(str(text), quote=False))
    return text.replace("\r", "").replace("\n", "<br>")


def render_markdown(data: dict, plot_files: dict[str, str]) -> str:
    lines: list[str] = []
    for blk in _blocks(data, plot_files):
        kind = blk[0]
        if kind == "h":
            lines += ["#" * blk[1] + " " + _md(blk[2]), ""]
        elif kind == "p":
            lines += [blk[1], ""]
        elif kind == "img":
            lines += [f"![{blk[1]}]({plot_files[blk[1]]})", ""]
        elif kind == "table":
            lines += ["| " + " | ".join(blk[1]) + " |", "|" + "---|" * len(blk[1])]
            lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in blk[2]] + [""]
        else:
            lines += [f"**{_md(label)}:** {_md(text)}\n" for label, text in blk[1]]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;margin:.3em;border:1px solid #eee}
.texts{display:flex;gap:1em}.texts>div{flex:1;min-width:0}.label{font-size:.85em;color:#555}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:.6em;border-left:3px solid #9ab;margin:0}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def render_html(data: dict, plots: dict[str, bytes]) -> str:
    e = html.escape
    parts: list[str] = []
    for blk in _blocks(data, plots):
        kind = blk[0]
        if kind == "h":
            parts.append(f"<h{blk[1]}>{e(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            parts.append(f"<p>{e(blk[1])}</p>")
        elif kind == "img":
            b64 = base64.b64encode(plots[blk[1]]).decode()
            parts.append(f'<img alt="{e(blk[1])}" src="data:image/png;base64,{b64}">')
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in blk[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            cols = "".join(f'<div><div class="label">{e(lbl)}</div><pre>{e(txt)}</pre></div>' for lbl, txt in blk[1])
            parts.append(f'<div class="texts">{cols}</div>')
    head = f'<meta charset="utf-8"><title>RLOO training report</title>\n<style>{CSS}</style>'
    return f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body>\n' + "\n".join(parts) + "\n</body></html>\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    from stages.io import atomic_path, write_text

    parser = argparse.ArgumentParser(prog="python -m stages.report", description="HTML + Markdown report of a run.")
    parser.add_argument("--rounds-dir", default="data/rounds")
    parser.add_argument("--eval-dir", default="data/eval")
    parser.add_argument("--eval-metrics", default="metrics/eval.json")
    parser.add_argument("--out-dir", default="reports")
    parser.add_argument("--checkpoint-dir", default="models/policy", help="the run's checkpoint (train.checkpoint_dir)")
    args = parser.parse_args(argv)

    data = build_data(args.rounds_dir, args.eval_dir, args.eval_metrics, checkpoint_dir=args.checkpoint_dir)
    plots = make_plots(data)
    out = Path(args.out_dir)
    files = {name: f"report_{name}.png" for name in plots}
    for name, png in plots.items():
        with atomic_path(out / files[name], ".png") as tmp:
            tmp.write_bytes(png)
    write_text(render_markdown(data, files), out / "report.md")
    write_text(render_html(data, plots), out / "report.html")
    print(f"wrote {out / 'report.html'} and {out / 'report.md'} ({len(data['rounds'])} rounds)")


if __name__ == "__main__":
    run_cli(main)
