"""stages.report: self-contained HTML + Markdown from a tiny fake run; escaping; no-eval and no-rounds cases; a damaged
round is refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from stages.errors import PipelineError
from stages.io import write_json, write_table
from stages.report import build_data, main
from stages.schemas import ADVANTAGES, SAMPLES

REPO = Path(__file__).resolve().parents[1]
K = 3
COMPLETIONS = {  # (prompt, sample_idx) -> text; advantages rank them
    ("p0", 0): "BEST-p0 the movie was great", ("p0", 1): "middle p0", ("p0", 2): "WORST-p0 a <b>dull</b> film & more",
    ("p1", 0): "WORST-p1 terrible", ("p1", 1): "BEST-p1 wonderful acting", ("p1", 2): "middle p1",
}
ADV = {("p0", 0): 0.9, ("p0", 1): 0.1, ("p0", 2): -1.0, ("p1", 0): -0.5, ("p1", 1): 0.7, ("p1", 2): -0.2}


def write_round(rounds: Path, r: int, *, manifest: bool = True, eval_metrics: bool = False) -> None:
    d = rounds / f"round={r:04d}"
    keys = sorted(COMPLETIONS)
    n = len(keys)
    samples = pl.DataFrame({
        "prompt_id": [p for p, _ in keys], "sample_idx": [i for _, i in keys],
        "prompt_text": [f"<user> review {p} <assistant> " for p, _ in keys],
        "completion": [COMPLETIONS[k] for k in keys], "completion_token_ids": [[1, 2, 3]] * n,
        "sampler_logprobs": [[-0.5, -0.5, -0.5]] * n, "num_tokens": [3] * n, "finish_reason": ["stop"] * n,
        "policy_version": [r] * n,
    }, schema=SAMPLES)
    advs = pl.DataFrame({
        "prompt_id": [p for p, _ in keys], "sample_idx": [i for _, i in keys], "rlhf_reward": [0.5] * n,
        "baseline": [0.4] * n, "advantage": [ADV[k] for k in keys], "estimator": ["rloo"] * n,
    }, schema=ADVANTAGES)
    write_table(samples, d / "samples.parquet", SAMPLES)
    write_table(advs, d / "advantages.parquet", ADVANTAGES)
    if not manifest:
        return
    metrics = {"reward": 0.3 + 0.1 * r, "reward_std": 0.05, "kl": 0.01 * r, "rlhf_reward": 0.3, "loss": -0.02,
               "entropy": 2.5, "advantage_std": 0.6, "completions/mean_length": 12.5, "time/round_s": 7.25}
    if eval_metrics:
        metrics |= {"eval/win_rate": 0.625, "eval/reward": 0.4, "eval/kl": 0.02}
    from stages.loop.resume import file_record
    from stages.loop.writer import manifest_for

    artifacts = {f: file_record(d / f, n) for f in ("samples.parquet", "advantages.parquet")}
    manifest = manifest_for(r, "abc123", "def456", artifacts, metrics, {"estimator": "rloo"}, None)
    write_json(manifest | {"finished_at": "2026-01-01T00:00:00"}, d / "manifest.json")


def write_eval(tmp: Path) -> tuple[Path, Path]:
    table = pl.DataFrame({
        "prompt_id": ["e0", "e1"], "prompt_text": ["<user> eval prompt 0", "<user> eval prompt 1"],
        "completion": ["POLICY-e0 lovely", "POLICY-e1 ok"], "num_tokens": [2, 2], "finish_reason": ["stop"] * 2,
        "policy_version": [2, 2], "score": [0.9, 0.2], "logp_policy": [-3.0, -4.0], "logp_ref": [-3.1, -4.2],
        "kl": [0.1, 0.2], "ref_completion": ["REF-e0 meh", "REF-e1 <i>fine</i>"], "ref_num_tokens": [2, 2],
        "ref_score": [0.3, 0.6],
    })
    write_table(table, tmp / "eval" / "eval.parquet")
    write_json({"reward": 0.55, "ref_reward": 0.45, "win_rate": 0.5, "kl": 0.15, "mean_length": 2.0,
                "ref_mean_length": 2.0, "prompts": 2, "policy_version": 2}, tmp / "eval.json")
    return tmp / "eval", tmp / "eval.json"


def run_report(tmp: Path, eval_dir: Path | None = None, eval_json: Path | None = None) -> tuple[str, str]:
    out = tmp / "reports"
    main(["--rounds-dir", str(tmp / "rounds"), "--eval-dir", str(eval_dir or tmp / "no_eval"),
          "--eval-metrics", str(eval_json or tmp / "no_eval.json"), "--out-dir", str(out)])
    return (out / "report.html").read_text(), (out / "report.md").read_text()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_round(tmp_path / "rounds", 0)
    write_round(tmp_path / "rounds", 1, eval_metrics=True)
    write_round(tmp_path / "rounds", 2, manifest=False)  # incomplete: ignored
    return tmp_path


def test_html_is_self_contained_with_plots_and_examples(run_dir):
    eval_dir, eval_json = write_eval(run_dir)
    page, _ = run_report(run_dir, eval_dir, eval_json)
    assert (run_dir / "reports" / "report.html").is_file()
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page)  # a payload may spell anything
    assert "http" not in text and "cdn" not in text.lower()
    assert re.findall(r'<img alt="(\w+)" src="data:image/png;base64,iVBOR', page) == ["reward", "win_rate",
                                                                                       "reward_gain", "kl"]
    for text in ("BEST-p0 the movie was great", "BEST-p1 wonderful acting", "WORST-p1 terrible"):
        assert text in page
    assert "middle p0" not in page  # only best and worst
    assert "WORST-p0 a &lt;b&gt;dull&lt;/b&gt; film &amp; more" in page and "<b>dull" not in page
    assert "POLICY-e0 lovely" in page and "REF-e0 meh" in page and "REF-e1 &lt;i&gt;fine&lt;/i&gt;" in page
    assert "no evaluation yet" not in page.lower()


def test_markdown_has_per_round_table_and_png_files(run_dir):
    _, md = run_report(run_dir)
    assert "| round | reward | reward_std | kl | loss | entropy | advantage_std | mean length | seconds |" in md
    assert "| 1 | 0.3000 | 0.0500 | 0.0000 | -0.0200 | 2.5000 | 0.6000 | 12.5 | 7.2 |" in md
    assert "| 2 | 0.4000 |" in md and "| 3 |" not in md  # round=0002 has no manifest
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (run_dir / "reports" / name).read_bytes().startswith(b"\x89PNG")
    assert "&lt;b&gt;dull&lt;/b&gt;" in md and "<b>" not in md
    assert "| estimator | rloo |" in md


def test_without_eval_says_no_evaluation(tmp_path):
    write_round(tmp_path / "rounds", 0)
    page, md = run_report(tmp_path)
    assert "no evaluation yet" in page.lower() and "no evaluation yet" in md.lower()
    assert "win_rate" not in build_data(tmp_path / "rounds", tmp_path / "x", tmp_path / "x.json")["rounds"][0]
    assert not (tmp_path / "reports" / "report_win_rate.png").exists()


def test_a_damaged_round_s_advice_knows_the_checkpoint(tmp_path):
    """A round before the checkpoint cannot be re-done from the base model: the report's advice for a damaged round
    is the run's own (restore it, or start over), not 're-do it from the base model'."""
    for r in range(2):
        write_round(tmp_path / "rounds", r)
    (tmp_path / "rounds" / "round=0000" / "advantages.parquet").unlink()
    with pytest.raises(PipelineError, match="re-do it from the base model") as exc:
        build_data(tmp_path / "rounds", tmp_path / "eval", tmp_path / "eval.json")  # no checkpoint
    (tmp_path / "policy").mkdir()
    from stages.checkpoint import FORMAT

    write_json({"format": FORMAT, "round": 2}, tmp_path / "policy" / "checkpoint.json")
    with pytest.raises(PipelineError, match="round 1 is damaged") as exc:
        build_data(tmp_path / "rounds", tmp_path / "eval", tmp_path / "eval.json", checkpoint_dir=tmp_path / "policy")
    assert "re-do" not in str(exc.value) and "start over" in str(exc.value)


def test_no_complete_rounds_raises(tmp_path):
    write_round(tmp_path / "rounds", 0, manifest=False)
    with pytest.raises(PipelineError, match="no complete rounds"):
        build_data(tmp_path / "rounds", tmp_path / "eval", tmp_path / "eval.json")


def test_cli_empty_rounds_dir_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.report", "--rounds-dir", str(empty), "--out-dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no complete rounds in") and "dvc repro train" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_round_is_a_one_line_error_naming_the_file(run_dir, damage):
    path = run_dir / "rounds" / "round=0000" / "samples.parquet"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.unlink()
    with pytest.raises(PipelineError) as exc:
        run_report(run_dir)
    msg = str(exc.value)
    assert str(path) in msg and "round 1 is damaged" in msg and "\n" not in msg
    assert not (run_dir / "reports" / "report.html").exists()


def test_eval_examples_are_the_best_and_the_worst_by_score_gap(tmp_path):
    from stages.report import build_data

    write_round(tmp_path / "rounds", 0)
    gaps = {"e0": 0.5, "e1": -0.7, "e2": 0.1, "e3": 0.3, "e4": -0.2}
    table = pl.DataFrame({
        "prompt_id": list(gaps), "prompt_text": [f"<user> {p}" for p in gaps], "completion": [f"P-{p}" for p in gaps],
        "score": [0.5 + g for g in gaps.values()], "ref_completion": [f"R-{p}" for p in gaps], "ref_score": [0.5] * 5,
    })
    write_table(table, tmp_path / "eval" / "eval.parquet")
    data = build_data(tmp_path / "rounds", tmp_path / "eval", tmp_path / "none.json", n_examples=3)
    picked = [r["prompt_id"] for r in data["eval_examples"]]
    assert picked == ["e0", "e3", "e1"]  # the two largest gains, then the largest loss


def test_a_missing_round_and_another_runs_evaluation_are_said(tmp_path, caplog):
    """A rounds dir with a hole (a training run refuses it; the report is a view) and a metrics/eval.json whose
    policy version is not this run's last round (another run's, or an earlier one): both are said, in the log and the
    report, instead of a quiet "(N rounds)" and a "Final evaluation" of some other policy."""
    import logging

    for r in (0, 1, 3):
        write_round(tmp_path / "rounds", r)
    eval_dir, eval_json = write_eval(tmp_path)  # policy version 2
    with caplog.at_level(logging.WARNING, logger="stages.report"):
        _, md = run_report(tmp_path, eval_dir, eval_json)
    assert "| missing rounds | 3 |" in md
    assert "Evaluation of policy version 2, not of this run's last round (4): another run's evaluation" in md
    assert "Final evaluation" not in md
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "round(s) 3 are missing or have no manifest" in said and "evaluates policy version 2" in said


def test_the_final_evaluation_of_the_last_round_is_called_so(run_dir):
    eval_dir, eval_json = write_eval(run_dir)  # policy version 2: rounds 1-2 complete
    _, md = run_report(run_dir, eval_dir, eval_json)
    assert "Final evaluation of policy version 2." in md and "missing rounds" not in md


def test_prompts_left_out_of_the_evaluation_are_not_its_examples(run_dir):
    """score.on_invalid: drop leaves a held-out prompt with a NaN/inf reward out of the metrics: the report counts it
    and does not show it as an example (a NaN sorts above every gap, so it headed 'the largest gains')."""
    eval_dir, eval_json = write_eval(run_dir)
    t = pl.read_parquet(eval_dir / "eval.parquet")
    nan = t.head(1).with_columns(prompt_id=pl.lit("e2"), completion=pl.lit("POLICY-e2 nan"), score=float("nan"))
    write_table(pl.concat([t, nan]), eval_dir / "eval.parquet")
    write_json(json.loads(eval_json.read_text()) | {"dropped": 1}, eval_json)
    page, md = run_report(run_dir, eval_dir, eval_json)
    assert "POLICY-e2" not in page and "POLICY-e2" not in md and "POLICY-e0 lovely" in md
    assert "| prompts left out (NaN/inf or no reward) | 1 |" in md
