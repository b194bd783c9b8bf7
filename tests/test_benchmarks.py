"""The benchmark scripts' bookkeeping (their measurements run with `make bench-*`, not in the test suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402
import bench_trl  # noqa: E402
import mutation_report  # noqa: E402
import numpy as np  # noqa: E402
import precision  # noqa: E402
import roofline  # noqa: E402
import sweep_baselines  # noqa: E402
import trl_replay  # noqa: E402
import tune  # noqa: E402

from stages.params import load_params  # noqa: E402


def _sweep_rows() -> pl.DataFrame:
    rows = []
    for est, var, std in (("rloo", 4.0, 2.0), ("reinforce", 9.0, 1.0)):
        for seed in (1, 2):
            rows.append({"estimator": est, "seed": seed, "round": 0, "eval_reward": 0.5, "eval_win_rate": 0.5})
            for r in (1, 2):
                rows.append({"estimator": est, "seed": seed, "round": r, "eval_reward": 0.5 + 0.01 * r * seed,
                             "eval_win_rate": 0.6, "train_reward": 0.4, "kl": 0.1, "advantage_std": std,
                             "grad_norm": 1.0, "grad_variance": var, "grad_signal": 1.0 if seed == 1 else -1.0,
                             "grad_snr": 0.1, "grad_mean_sq_norm": 2.0, "round_s": 1.0})
    return pl.DataFrame(rows, infer_schema_length=None)


def test_sweep_table_and_plot(tmp_path):
    df = _sweep_rows()
    md = sweep_baselines.write_outputs(df, tmp_path, {"rounds": 2, "seeds": 2, "date": "d", "machine": "m"})
    s = sweep_baselines.summarize(df, 2).to_dicts()
    assert [r["estimator"] for r in s] == ["rloo", "reinforce"]  # the article's order
    rloo, reinforce = s
    assert rloo["norm_var_mean"] == pytest.approx(4.0 / 2.0**2) and reinforce["norm_var_mean"] == pytest.approx(9.0)
    assert rloo["reward_mean"] == pytest.approx((0.52 + 0.54) / 2) and rloo["seeds"] == 2
    assert rloo["signal_negative"] == pytest.approx(0.5)
    # 95 % t-interval over 2 seeds: mean +- 12.706 * sd / sqrt(2); reinforce minus rloo paired by seed: 0 exactly
    half = 12.706 * 0.01 / 2 ** 0.5 * 2 ** 0.5  # sd of (0.52, 0.54) is 0.01 * sqrt(2)
    assert (rloo["reward_low"], rloo["reward_high"]) == pytest.approx((0.53 - half, 0.53 + half))
    assert reinforce["vs_rloo"] == pytest.approx(0.0) and rloo["vs_rloo"] != rloo["vs_rloo"]  # NaN for rloo itself
    assert rloo["rounds_to_target"] == pytest.approx(1.5) and rloo["reached"] == "2/2"  # seed 1 at round 2, seed 2 at 1
    assert "| rloo | 2 |" in md and "| reinforce | 2 |" in md and "(not significant)" in md
    assert (tmp_path / "baselines.md").read_text() == md
    assert (tmp_path / "baselines.png").stat().st_size > 10_000


def test_sweep_curve_has_only_the_evaluated_rounds():
    df = _sweep_rows().with_columns(  # evaluated at rounds 0 and 2 only (--eval-every 2)
        pl.when(pl.col("round") == 1).then(None).otherwise(pl.col("eval_reward")).alias("eval_reward"))
    c = sweep_baselines.held_out_curve(df, "rloo")
    assert c["round"].to_list() == [0, 2]  # not a 0 at round 1
    assert c["m"].to_list() == pytest.approx([0.5, (0.52 + 0.54) / 2])
    assert c["s"].to_list() == pytest.approx([0.0, 12.706 * 0.01 * 2 ** 0.5 / 2 ** 0.5])  # t(1) * sd / sqrt(2)


def test_sweep_resume_key_is_the_budget_only():
    base = load_params("params.yaml", {"update.grad_variance": True})
    key = sweep_baselines.run_key(base, 3)
    same = {"train.async_checkpoint": False, "train.rounds_dir": "x", "train.checkpoint_dir": "y", "base.seed": 9,
            "advantage.estimator": "grpo", "train.eval_every": 2, "mlflow.log_completions": 0}
    assert sweep_baselines.run_key(load_params("params.yaml", {"update.grad_variance": True, **same}), 3) == key
    assert sweep_baselines.run_key(base, 4) != key
    assert sweep_baselines.run_key(load_params("params.yaml", {"update.grad_variance": True, "update.learning_rate": 1e-4}), 3) != key


def test_roofline_counts_each_token_once_and_the_lm_head_at_completion_tokens_only():
    prompts, completions = [[1, 2, 3], [1, 2, 3], [4, 5]], [[7, 8], [9], []]
    # shared: the two distinct prompts (5 tokens) + 3 completion tokens through the body; the lm_head at 3 positions
    assert roofline.forward_flops(prompts, completions, 10, 100, share=True) == 2.0 * (10 * 8 + 100 * 3)
    assert roofline.forward_flops(prompts, completions, 10, 100, share=False) == 2.0 * (10 * 11 + 100 * 3)


def test_trl_table_has_ratios_and_says_why_an_arm_failed():
    ok = {"ok": True, "warm_s": 3.0, "step_wall_s": 10.0, "precision": "p", "peak_rss_gib": 1.0,
          "steps": [{"round_s": 9.0, "sample_s": 2.0, "score_s": 3.0, "update_s": 4.0, "tokens": 64, "reward": 0.3,
                     "kl": 0.0, "mean_length": 16.0}] * 2}
    ours = bench_trl.summarize("ours", ok, {"reward": 0.5, "ref_reward": 0.4, "win_rate": 0.6, "kl": 0.1})
    trl = bench_trl.summarize("trl", {**ok, "step_wall_s": 25.0, "final_save_s": 1.25}, {"reward": 0.45, "ref_reward": 0.4, "win_rate": 0.55, "kl": 0.2})
    bad = bench_trl.summarize("trl-vllm", {"ok": False, "error": "AttributeError: x (at a.py:1 f -> b.py:2 g)"}, {})
    assert ours["gen_tokens_per_s"] == pytest.approx(128 / 4.0)
    md = bench_trl.markdown([ours, trl, bad], {"date": "d", "machine": "m", "steps": 2, "prompts": 8, "k": 4,
                                               "tokens": 32, "lr": 1e-6, "beta": 0.02})
    assert "| ours | 10.0 |" in md and "1.00x" in md and "2.50x" in md
    assert "TRL's step time over ours: trl / ours 2.50x." in md and "ours: 9.0, 9.0" in md
    assert "| trl-vllm | failed: AttributeError: x (at a.py:1 f -> b.py:2 g) |" in md
    # TRL's final save counts in its step (wall) as ours' final checkpoint does in ours', and the table says how long
    assert "TRL: `train()` and its final `save_model` (trl 1.2 s))." in md


def test_tune_grid_is_every_combination_with_yaml_values():
    grid = tune.parse_grid(["update.learning_rate=1e-5,2.0e-5", "score.beta=0.05", "sample.stop=[]", "x.y=a"])
    assert grid == [{"update.learning_rate": 1e-5, "score.beta": 0.05, "sample.stop": [], "x.y": "a"},
                    {"update.learning_rate": 2.0e-5, "score.beta": 0.05, "sample.stop": [], "x.y": "a"}]
    assert tune.parse_grid([]) == [{}]


def test_every_surviving_mutant_gets_a_reason_or_is_flagged_for_review():
    def diff(old: str, new: str) -> str:
        return f"--- stages/x.py\n+++ stages/x.py\n@@ -1 +1 @@\n-    {old}\n+    {new}\n"

    call = 'lp, _ = sequence_logprobs(m, p, c, pad, bs, progress="logp ref", **opts)'
    label = mutation_report.reason("stages.score.x_score_samples__mutmut_1",
                                   diff(call, call.replace('"logp ref"', '"XXlogp refXX"')))
    assert label == "a progress-bar label: display only"
    assert "pad id" in mutation_report.reason("stages.score.x_score_samples__mutmut_2", diff(call, call.replace("pad, ", "")))
    assert "batch size" in mutation_report.reason("stages.score.x_score_samples__mutmut_3", diff(call, call.replace("bs, ", "")))
    # a change to what is computed is never explained away
    real = mutation_report.reason("stages.score.x_score_samples__mutmut_4", diff("kl = lp - lr", "kl = lp + lr"))
    assert real.startswith("no reason recorded")
    assert mutation_report.reason("stages.loss.x_policy_loss__mutmut_5",
                                  diff("loss = x.sum(-1)", "loss = x.mean(-1)")).startswith("no reason recorded")


def test_trl_arms_are_means_over_the_repeats_that_have_each_number():
    run = lambda arm, wall, reward: {"arm": arm, "ok": True, "step_wall_s": wall, "eval_reward": reward,
                                     "precision": "fp32"}
    runs = [run("ours", 13.0, 0.5), run("trl", 21.0, None), run("ours", 14.0, 0.7), run("trl", 23.0, 0.4),
            {"arm": "trl-vllm", "ok": False, "error": "boom"}]
    ours, trl, failed = bench_trl.aggregate(runs, ["ours", "trl", "trl-vllm"])
    assert (ours["step_wall_s"], ours["step_wall_min"], ours["step_wall_max"]) == (13.5, 13.0, 14.0)
    assert ours["eval_reward"] == pytest.approx(0.6) and ours["evaluated"] == 2
    assert trl["eval_reward"] == 0.4 and trl["evaluated"] == 1 and trl["step_wall_s"] == 22.0  # the failed eval left out
    assert failed == runs[-1]
    assert bench_trl.spread(ours) == " [13.0-14.0]" and bench_trl.evaluated(trl) == " (n=1)"


def test_trl_steady_step_leaves_out_the_first_two_steps():
    def run(arm, wall, *rounds):
        steps = [{"round_s": x, "sample_s": 1.0, "score_s": 1.0, "update_s": x - 2, "tokens": 64, "reward": 0.3,
                  "kl": 0.0} for x in rounds]
        return bench_trl.summarize(arm, {"ok": True, "step_wall_s": wall, "steps": steps}, {})

    phases = lambda *r: [{"round_s": x} for x in r]  # noqa: E731
    runs = [run("ours", 15.0, 20.0, 15.0, 10.0, 12.0), run("ours", 13.25, 19.0, 14.0, 9.0, 9.0),
            run("trl", 34.0, 40.0, 35.0, 30.0, 30.0)]
    # steps 3-4 on their own clocks (11.0) plus what the clocks leave out per step (wall 15.0 - mean clock 14.25)
    assert bench_trl.steady_step(runs[0]) == 11.0 + 0.75
    assert bench_trl.steady_step({"step_phases": phases(5.0, 6.0)}) is None  # fewer than 3 steps
    assert bench_trl.steady_step({"step_phases": phases(5.0, None, 6.0)}) is None
    assert bench_trl.steady_step({"step_phases": phases(5.0, 6.0, 4.0)}) == 4.0  # no wall: the clocks alone
    runs.append(run("ours", 9.0, 8.0, 9.0))  # a repeat with 2 steps: no steady figure, counted in n
    runs.append({"arm": "trl", "ok": False, "error": "boom"})
    ours, trl = bench_trl.aggregate(runs, ["ours", "trl"])
    assert ours["steady_s"] == pytest.approx((11.75 + 9.5) / 2) and ours["steady_n"] == 2 and ours["repeats_ok"] == 3
    assert trl["steady_s"] == 30.25 and trl["steady_n"] == 1
    md = bench_trl.markdown([ours, trl], {"date": "d", "machine": "m", "steps": 4, "prompts": 8, "k": 4, "tokens": 32,
                                          "lr": 1e-6, "beta": 0.02})
    assert "From the third step on" in md and "ours 10.6 s (n=2), trl 30.2 s a step: trl / ours 2.85x." in md


def test_precision_table_holds_each_kl_against_fp32_for_both_passes():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.1, 0.1, 0.3])
    exact_p, exact_r = np.linspace(-20, -10, 8), np.full(8, -16.0)
    shift = np.array([0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # one large error flips two advantages' signs
    rows = precision.error_table({"fp32 pass": exact_p, "bf16 engine": exact_p + shift}, {"fp32 pass": exact_r},
                                 np.full(8, 10), score, groups, beta=0.1)
    exact, off = rows
    assert exact["mean_abs_err"] == exact["max_abs_err"] == exact["adv_moved"] == exact["sign_flips"] == 0.0
    assert off["mean_abs_err"] == pytest.approx(11.0 / 8) and off["max_abs_err"] == pytest.approx(10.0)
    assert off["bias"] == pytest.approx(10.0 / 8) and off["mean_kl"] == pytest.approx((exact_p - exact_r).mean() + 10.0 / 8)
    rlhf = score - 0.1 * (exact_p - exact_r)
    assert precision.rloo_advantages(rlhf, groups)[0] == pytest.approx(rlhf[0] - rlhf[1:4].mean())
    assert off["sign_flips"] == 2 / 8 and off["adv_moved"] > 0  # the other two completions of that prompt
    token = precision.error_table({"fp32 pass": exact_p, "x": exact_p + shift}, {"fp32 pass": exact_r}, np.full(8, 10),
                                  score, groups, beta=0.1, kl_level="token")[1]
    assert token["max_abs_err"] == pytest.approx(1.0)  # per token: divided by the 10 tokens


def test_precision_defaults_follow_the_params_resolution(monkeypatch):
    """The (policy, reference) sources precision.py marks as the default, and bench_trl's label, are what the flow runs."""
    import torch

    import stages.runtime as runtime

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with_ = lambda sample, score: params.model_copy(update={  # noqa: E731
        "sample": params.sample.model_copy(update=sample), "score": params.score.model_copy(update=score)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "amx_bf16", lambda: True)  # AMX: a bf16 engine, so a bf16 policy pass
    monkeypatch.setattr(runtime, "fast_bf16", lambda: True)
    assert precision.defaults(params) == ("bf16 pass", "bf16 pass")
    assert precision.defaults(with_({}, {"dtype": "float32"})) == ("fp32 engine", "fp32 pass")  # an fp32 KL: no pass
    monkeypatch.setattr(runtime, "amx_bf16", lambda: False)
    for native, ref in ((True, "bf16 pass"), (False, "fp32 pass")):
        monkeypatch.setattr(runtime, "fast_bf16", lambda native=native: native)
        assert precision.defaults(params) == ("fp32 engine", ref)  # CPU: the fp32 engine's logprobs are reused
        assert precision.defaults(with_({"dtype": "bfloat16"}, {"policy_logprobs": "sampler"})) == ("bf16 engine", ref)
        assert precision.defaults(with_({"dtype": "bfloat16"}, {})) == (ref, ref)  # auto: a bf16 engine's are not
        assert precision.defaults(with_({}, {"policy_logprobs": "trainer"})) == (ref, ref)
        assert precision.defaults(with_({}, {"dtype": "float32"})) == ("fp32 engine", "fp32 pass")
    assert "policy logprobs the bf16 engine's, reference the fp32 pass" in bench_trl._precision(
        with_({"dtype": "bfloat16"}, {"policy_logprobs": "sampler"}))
    # a bf16 engine on a CPU with AMX: the update's own forward gives them, where the round is one micro-batch
    monkeypatch.setattr(runtime, "amx_bf16", lambda: True)
    monkeypatch.setattr(runtime, "fast_bf16", lambda: True)
    assert ("policy logprobs the update's own forward (bf16, run in the score step), reference the bf16 pass"
            in bench_trl._precision(params))
    up = params.update.model_copy(update={"micro_batch_size": 8})
    assert "policy logprobs the bf16 pass's" in bench_trl._precision(params.model_copy(update={"update": up}))


def _roofline_run() -> tuple[dict, list, list]:
    """A roofline.json's (meta, rows, table), made up: three rounds, six phases."""
    meta = {"date": "d", "machine": "m", "round_s": 10.0, "peaks_gflops": {"float32": 100.0, "bfloat16": 400.0},
            "vllm_rate_by_batch": {"32": 200.0, "64": 250.0}}
    rows = [{"fwd_flops": 9e12, "generated": 9999}] + [{"fwd_flops": 4e11, "generated": 500}] * 2  # round 1: left out
    table = [["sample", "float32", "", 3.0, "", ""], ["reward", "-", "", 0.5, "", ""],
             ["policy logprobs", "-", "skipped", 0.0, "-", "-"], ["reference logprobs", "bfloat16", "", 1.5, "", ""],
             ["update", "bfloat16", "", 4.0, "", ""], ["weight sync", "float32", "", 1.0, "", ""]]
    return meta, rows, table


def test_roofline_floor_is_each_phase_at_its_peak_plus_the_rest_as_measured():
    meta, rows, table = _roofline_run()
    f = roofline.floor_s(meta, rows, table)
    assert f["by_phase"] == pytest.approx({"sample": 2.0, "reference logprobs": 1.0, "update": 3.0})
    assert f["compute"] == pytest.approx(6.0) and f["rest"] == pytest.approx(1.5) and f["round"] == pytest.approx(7.5)
    md = roofline.render(meta, rows, table)
    assert "**Floor at this machine's peaks: 7.50 s a round**" in md and "1.33x its floor" in md
    assert md.count("\n| ") == 8  # the header, six phases and the round


def test_roofline_leaves_out_the_rounds_its_file_says_settle():
    """A run that leaves out its first two rounds (the second still grows into new memory) takes the floor's work
    from the rest and says so; a file from before (no `settle_rounds`) left out the first only."""
    meta, rows, table = _roofline_run()
    rows = rows[:1] + [{"fwd_flops": 9e12, "generated": 9999}] + rows[1:]  # round 2 is left out as well
    two = meta | {"settle_rounds": 2}
    assert roofline.settled(two, rows) == rows[2:] and roofline.settled(meta, rows) == rows[1:]
    assert roofline.floor_s(two, rows, table) == roofline.floor_s(meta, rows[1:], table)
    assert "2 warm round(s) after the first 2 (means)" in roofline.render(two, rows, table)
    assert "3 warm round(s) after the first (means)" in roofline.render(meta, rows, table)
    assert "1 round(s), none left out (means)" in roofline.render(meta, rows[:1], table)  # a one-round file
    with pytest.raises(SystemExit):  # a run that would leave nothing to measure
        roofline.main(["--rounds", "2", "--out", "unused"])
    with pytest.raises(SystemExit):  # nothing to render (a usage error, not a traceback)
        roofline.main(["--render", "--out", "no-such-dir"])


def test_roofline_floor_of_an_update_whose_forward_ran_at_scoring_is_its_backward():
    meta, rows, table = _roofline_run()
    table[2] = ["policy logprobs", "bfloat16", "", 1.2, "", ""]  # the update's forward, run for the KL
    f = roofline.floor_s(meta | {"update_forward_at_scoring": True}, rows, table)
    assert f["by_phase"] == pytest.approx({"sample": 2.0, "policy logprobs": 1.0, "reference logprobs": 1.0,
                                           "update": 2.0})


def test_roofline_splits_a_profiled_pass_into_its_matmuls_and_the_rest():
    """`profiled`: the matmul ops' FLOPs from their recorded shapes (mm, addmm, bmm, baddbmm), their seconds apart
    from every other op's, and the second table says each pass's matmul rate against the peak of its dtype."""
    import torch

    a, b, x, y = torch.randn(64, 32), torch.randn(32, 16), torch.randn(4, 8, 5), torch.randn(4, 5, 3)

    def work():
        torch.bmm(x, y)
        torch.addmm(torch.zeros(16), a, b)
        torch.baddbmm(torch.zeros(4, 8, 3), x, y)
        return (a @ b + 1).relu().sum()

    out, got = roofline.profiled(work)
    assert torch.equal(out, (a @ b + 1).relu().sum())  # the pass's own result
    assert got["matmul_calls"] == 4 and got["matmul_flops"] == 2 * (2 * 64 * 32 * 16) + 2 * (2 * 4 * 8 * 5 * 3)
    largest = {k for k, _, _ in got["largest_other"]}
    assert got["other_calls"] >= 3 and len(largest) == 3 and not largest & set(roofline.MATMULS)
    assert 0 < got["matmul_s"] + got["other_s"] <= got["wall_s"] + 1e-3 and got["outside_s"] >= 0
    meta, rows, table = _roofline_run()
    pass_ = {"wall_s": 2.0, "matmul_s": 0.5, "matmul_calls": 10, "matmul_flops": 1e11, "other_s": 1.0,
             "other_calls": 99, "outside_s": 0.5, "largest_other": [["aten::copy_", 0.4, 50]], "dtype": "bfloat16"}
    md = roofline.render(meta, rows, table, {"reference logprobs": pass_})
    assert ("| reference logprobs | bfloat16 | 2.00 | 0.50 s (25 %), 10 calls | 200 GFLOP/s (50 % of bfloat16 peak) | "
            "1.00 s (50 %), 99 calls | copy_ 0.40 s | 0.50 s (25 %) |") in md
    assert "Where the torch passes' time goes" not in roofline.render(meta, rows, table)  # a file from before


def test_trl_seeds_pair_each_arms_held_out_reward_by_seed():
    """`--seeds`: each seed's held-out reward side by side, and the paired difference's mean, sd and t interval."""
    import statistics

    rewards = {"ours": [0.60, 0.55, 0.58], "trl": [0.50, 0.57, 0.52]}
    runs = [{"arm": arm, "ok": True, "seed": 42 + i, "eval_reward": x, "eval_win_rate": 0.5 + x / 10,
             "step_wall_s": 1.0} for i in range(3) for arm, xs in rewards.items() for x in [xs[i]]]
    res = bench_trl.by_seed(runs)
    assert res["seeds"] == [42, 43, 44] and res["arms"]["trl"] == {42: 0.50, 43: 0.57, 44: 0.52}
    (pair,) = res["pairs"]
    d = [a - b for a, b in zip(rewards["ours"], rewards["trl"])]
    assert pair["diffs"] == pytest.approx(d) and pair["mean"] == pytest.approx(statistics.mean(d))
    assert pair["sd"] == pytest.approx(statistics.stdev(d)) and pair["ours_better"] == 2
    half = 4.303 * statistics.stdev(d) / 3**0.5  # t(0.975, 2 df)
    assert pair["ci"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half])
    one = 2.920 * statistics.stdev(d) / 3**0.5  # t(0.95, 2 df): the 90 % interval's half, each one-sided test's
    assert pair["worst"] == pytest.approx(statistics.mean(d) - one)
    assert pair["margin"] == pytest.approx(abs(statistics.mean(d)) + one)
    md = "\n".join(bench_trl.seed_lines(runs))
    m = statistics.mean(d)
    assert (f"One-sided, at 95 % confidence, ours is at worst {one - m:.3f} below trl; the 90 % interval "
            f"[{m - one:+.3f}, {m + one:+.3f}] lies within +-{m + one:.3f}") in md
    ahead = [{**r, "eval_reward": r["eval_reward"] + (0.5 + 0.01 * r["seed"] % 3) * (r["arm"] == "ours")} for r in runs]
    assert "ours is at least " in "\n".join(bench_trl.seed_lines(ahead))  # the bound above 0 reads the other way
    same = [{**r, "eval_reward": 0.5 + 0.1 * (r["arm"] == "ours")} for r in runs]  # sd 0: no bound, no margin
    (line,) = [x for x in bench_trl.seed_lines(same) if x.startswith("ours - trl, held-out reward")]
    assert "sd 0.000" in line and "One-sided" not in line
    assert "| 42 | 0.600 (0.560) | 0.500 (0.550) |" in md
    assert f"ours - trl, held-out reward: {statistics.mean(d):+.3f} on average over 3 seeds" in md
    assert "ours higher on 2 of 3" in md
    # a seed one arm did not evaluate leaves the pair; one seed only (or no --seeds) adds nothing
    runs[-1]["eval_reward"] = None
    assert bench_trl.by_seed(runs)["pairs"][0]["n"] == 2
    stopped = [*runs, {"arm": "ours", "ok": False, "seed": 45, "eval_reward": None}]  # interrupted: not a seed
    assert bench_trl.by_seed(stopped)["seeds"] == [42, 43, 44]
    assert bench_trl.by_seed([{**r, "seed": None} for r in runs]) is None and bench_trl.seed_lines(runs[:2]) == []
    assert bench_trl.t975(11) == 2.228 and bench_trl.t975(45) == 2.021 and bench_trl.t975(500) == 1.96
    assert bench_trl.t95(11) == 1.812 and bench_trl.t95(45) == 1.684 and bench_trl.t95(500) == 1.645
    ours, trl = bench_trl.aggregate([{**r, "repeat": i} for i, r in enumerate(runs)], ["ours", "trl"])
    assert ours["seeds"] == [42, 43, 44] and "seed" not in ours and "repeat" not in ours


def test_alternate_arms_gives_each_repeat_its_own_arguments(tmp_path):
    """What `--seeds` rests on: every arm of repeat r gets `repeat_args(r)` (here its seed), the same arguments else."""
    import json

    from machine import alternate_arms

    script = tmp_path / "bench" / "worker.py"
    script.parent.mkdir()
    script.write_text("import json, sys\nw = sys.argv[sys.argv.index('--work') + 1]\n"
                      "open(w + '/argv.json', 'w').write(json.dumps(sys.argv[1:]))\n")
    out = {}
    for rep, arm, work, rc in alternate_arms(tmp_path, ["a", "b"], 2, str(script), ["--steps", "2"], "x",
                                             repeat_args=lambda r: ["--seed", str(42 + r)]):
        assert rc == 0
        out[rep, arm] = json.loads((work / "argv.json").read_text())
    assert out[1, "b"] == ["--worker", "b", "--work", str(tmp_path / "b-1"), "--steps", "2", "--seed", "43"]
    assert [out[k][-1] for k in sorted(out)] == ["42", "42", "43", "43"]
    assert bench_trl.seed_overrides(bench_trl.argparse.Namespace(seed=43)) == {"base.seed": 43}
    assert bench_trl.seed_overrides(bench_trl.argparse.Namespace(seed=None)) == {}


def test_trl_render_from_two_sittings_pairs_all_their_seeds(tmp_path):
    """`--first-seed` + `--render --from`: seeds run at two sittings share one table; a repeated seed or another
    task stops with the fix named, and --first-seed without --seeds is refused."""
    import json

    from stages.errors import PipelineError

    meta = {"date": "d1", "machine": "m", "steps": 4, "repeats": 2, "seeds": True, "prompts": 8, "k": 4,
            "tokens": 32, "lr": 2e-5, "beta": 0.1}

    def sitting(name, seed_list, date, **over):
        runs = [{"arm": a, "ok": True, "seed": s, "repeat": i, "eval_reward": 0.5 + (a == "ours") * 0.01 * (s or 0) % 1,
                 "eval_win_rate": 0.5, "step_wall_s": 1.0 + (a == "trl"), "eval_kl": 0.1,
                 **dict.fromkeys(("sample_s", "score_s", "update_s", "gen_tokens_per_s", "warm_s", "peak_rss_gib")),
                 } for i, s in enumerate(seed_list)
                for a in ("ours", "trl")]
        (tmp_path / name).mkdir()
        (tmp_path / name / "trl.json").write_text(json.dumps({"meta": {**meta, "date": date, **over}, "runs": runs}))
        return tmp_path / name

    a, b = sitting("a", [42, 43], "d1"), sitting("b", [44, 45], "d2")
    out = tmp_path / "both"
    bench_trl.main(["--render", "--from", str(a), str(b), "--out", str(out)])
    saved = json.loads((out / "trl.json").read_text())
    assert [r["repeat"] for r in saved["runs"] if r["arm"] == "ours"] == [0, 1, 2, 3]
    assert saved["meta"]["repeats"] == 4 and saved["meta"]["date"] == "d1, d2"
    assert "over 4 seeds" in (out / "trl.md").read_text() and saved["arms"][0]["seeds"] == [42, 43, 44, 45]
    with pytest.raises(PipelineError, match="one ran with --seeds, the other without"):
        bench_trl.main(["--render", "--from", str(a), str(sitting("u", [None], "d3", seeds=False)), "--out", str(out)])
    with pytest.raises(PipelineError, match="seed 44 of arm ours ran twice .* --first-seed"):
        bench_trl.main(["--render", "--from", str(b), str(sitting("c", [44], "d3")), "--out", str(out)])
    with pytest.raises(PipelineError, match=r"another task .*\(k differ\)"):
        bench_trl.main(["--render", "--from", str(a), str(sitting("d", [46], "d3", k=8)), "--out", str(out)])
    with pytest.raises(PipelineError, match="--first-seed needs --seeds"):
        bench_trl.main(["--first-seed", "45", "--out", str(out)])
    with pytest.raises(PipelineError, match="--from goes with --render"):
        bench_trl.main(["--from", str(a), "--out", str(out)])
    with pytest.raises(PipelineError, match="--out .* is one of the --from folders"):
        bench_trl.main(["--render", "--from", str(a), str(b), "--out", str(a)])
    # folders that record the model, temperature and top_p must agree on them too
    e, f = sitting("e", [50], "d4", model="smollm2", temperature=1.0, top_p=1.0), sitting("f", [51], "d5", model="x")
    with pytest.raises(PipelineError, match=r"another task \(model differs"):
        bench_trl.main(["--render", "--from", str(e), str(f), "--out", str(out)])
    old = sitting("old", [52], "d6")  # no model recorded: e and f are still compared with each other
    with pytest.raises(PipelineError, match=r"ran another task \(model differs"):
        bench_trl.main(["--render", "--from", str(old), str(e), str(f), "--out", str(out)])
    bench_trl.main(["--render", "--from", str(out), str(e), "--out", str(tmp_path / "three")])  # a join joins again
    three = json.loads((tmp_path / "three" / "trl.json").read_text())["meta"]
    assert three["sittings"] == ["d1: m", "d2: m", "d4: m"] and "model" not in three  # only e recorded it
    assert "Joined from 3 sittings: (1) d1: m; (2) d2: m; (3) d4: m." in (tmp_path / "three" / "trl.md").read_text()
    # TRL's step time holds its final save from 2026-12-04's sittings on: folders of both kinds do not share a table
    saved_g = sitting("g", [60], "d7")
    g = json.loads((saved_g / "trl.json").read_text())
    for r in g["runs"]:
        if r["arm"] == "trl":
            r["final_save_s"] = 2.5
    (saved_g / "trl.json").write_text(json.dumps(g))
    with pytest.raises(PipelineError, match=r"g count TRL's final save in its step time, .*a do not"):
        bench_trl.main(["--render", "--from", str(a), str(saved_g), "--out", str(out)])
    assert "TRL: `train()` only, its final save not counted" in (tmp_path / "three" / "trl.md").read_text()
    # the code each sitting measured (recorded since 2026-12-07): in the header, joined; none where none recorded it
    assert ", code " not in (tmp_path / "three" / "trl.md").read_text() and three.get("code") is None
    h, i = sitting("h", [70], "d8", code="abc1234"), sitting("i", [71], "d9", code="def5678-dirty")
    bench_trl.main(["--render", "--from", str(h), str(i), str(old), "--out", str(tmp_path / "coded")])
    joined = json.loads((tmp_path / "coded" / "trl.json").read_text())["meta"]
    assert joined["sittings"] == ["d8: m, code abc1234", "d9: m, code def5678-dirty", "d6: m"]  # each its own
    text = (tmp_path / "coded" / "trl.md").read_text()
    assert text.startswith("d8, d9, d6, m; ")
    assert "(1) d8: m, code abc1234; (2) d9: m, code def5678-dirty; (3) d6: m." in text


def test_code_version_names_the_checked_out_commit():
    import subprocess

    from machine import code_version

    root = str(Path(__file__).resolve().parents[1])
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert head, "the tests run from a git checkout (CI clones one)"
    assert code_version() in (head, head + "-dirty")


def test_trl_sitting_stopped_part_way_keeps_its_finished_runs(tmp_path, monkeypatch):
    """The runs so far are saved after every run to trl.partial.json, beside an earlier sitting's trl.json (left as
    it was): a sitting interrupted in its third run keeps the two it finished, a new sitting will not write over
    them, and `--render --from` joins them with another sitting's; a sitting that ends writes trl.json alone."""
    import json

    import machine

    from stages.errors import PipelineError

    for need in ("models/base/config.json", "data/prepared/train.parquet", "data/prepared/eval.parquet"):
        (tmp_path / need).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / need).write_text("")
    monkeypatch.setattr(bench_trl, "ROOT", tmp_path)
    monkeypatch.setattr(machine, "describe", lambda: "m")
    monkeypatch.setattr(bench_trl, "evaluate", lambda policy, work, params: {"reward": 0.5, "win_rate": 0.5, "kl": 0.1})
    step = {"round_s": 1.0, "sample_s": 0.5, "score_s": 0.2, "update_s": 0.3, "tokens": 32, "reward": 0.4, "kl": 0.0}

    def runs_then(stop_at):
        def gen(tmp, arms, repeats, script, args, unit, glibc_arms=(), repeat_args=None):
            for i, (rep, arm) in enumerate((r, a) for r in range(repeats) for a in arms):
                if i == stop_at:
                    raise KeyboardInterrupt  # Ctrl-C during this run
                work = Path(tmp) / f"{arm}-{rep}"
                work.mkdir()
                (work / "result.json").write_text(json.dumps({"ok": True, "policy": "p", "steps": [step] * 4,
                                                             "step_wall_s": 1.5, "warm_s": 2.0, "peak_rss_gib": 1.0}))
                yield rep, arm, work, 0
        return gen

    out = tmp_path / "stopped"
    out.mkdir()
    (out / "trl.json").write_text("an earlier sitting's")
    monkeypatch.setattr(machine, "alternate_arms", runs_then(2))
    sitting = ["--steps", "4", "--repeats", "2", "--seeds", "--first-seed", "60", "--arms", "ours", "trl"]
    with pytest.raises(KeyboardInterrupt):
        bench_trl.main([*sitting, "--out", str(out)])
    assert (out / "trl.json").read_text() == "an earlier sitting's"  # stays until a sitting ends
    saved = json.loads((out / "trl.partial.json").read_text())
    assert [(r["arm"], r["seed"]) for r in saved["runs"]] == [("ours", 60), ("trl", 60)]
    meta = saved["meta"]
    assert meta["partial"] == "2 runs" and meta["repeats"] == 1 and meta["planned"] == "2 repeat(s) of 2 arm(s)"
    assert meta["temperature"] == 1.0 and meta["model"] == load_params("params.yaml").base.model
    assert "**Partial: 2 runs of 2 repeat(s) of 2 arm(s) planned" in (out / "trl.partial.md").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "trl.json").write_text(json.dumps({"meta": {k: v for k, v in meta.items() if k not in ("partial", "planned")},
                                                "runs": [{**r, "seed": 61} for r in saved["runs"]]}))
    with pytest.raises(PipelineError, match="holds a finished trl.json and trl.partial.json"):
        bench_trl.main(["--render", "--from", str(out), str(other), "--out", str(tmp_path / "joined")])
    with pytest.raises(PipelineError, match="holds the runs of a sitting that stopped part-way"):
        bench_trl.main([*sitting, "--out", str(out)])  # a new sitting would write over them
    (out / "trl.json").unlink()
    bench_trl.main(["--render", "--out", str(out)])  # in place: stays the partial file
    assert not (out / "trl.json").exists() and json.loads((out / "trl.partial.json").read_text())["meta"] == meta
    bench_trl.main(["--render", "--from", str(out), str(other), "--out", str(tmp_path / "joined")])
    joined = json.loads((tmp_path / "joined" / "trl.json").read_text())
    assert joined["arms"][0]["seeds"] == [60, 61] and joined["meta"]["stopped"] == [{"sitting": 1, "runs": "2 runs"}]
    assert "partial" not in joined["meta"] and joined["meta"]["repeats"] == 2
    assert "Sitting (1) stopped part-way, after 2 runs" in (tmp_path / "joined" / "trl.md").read_text()
    # a sitting that ends: trl.json, no partial file left, no partial marker
    monkeypatch.setattr(machine, "alternate_arms", runs_then(None))
    bench_trl.main([*sitting, "--out", str(tmp_path / "done")])
    assert sorted(f.name for f in (tmp_path / "done").iterdir()) == ["trl.json", "trl.md"]
    done = json.loads((tmp_path / "done" / "trl.json").read_text())
    assert "partial" not in done["meta"] and done["meta"]["repeats"] == 2 and len(done["runs"]) == 4


def test_trl_replay_pairs_advantages_by_completion_not_by_row():
    ours = {"prompt_text": ["a", "a", "b", "b"], "completion_token_ids": [[1], [2], [3], [3]],
            "advantage": [0.5, -0.5, 0.0, 0.0]}
    rows = [["b", [3]], ["a", [2]], ["b", [3]], ["a", [1]]]  # TRL's order differs: the same completions
    assert trl_replay.advantage_gap(ours, rows, [0.0, -0.5 + 1e-6, 0.0, 0.5]) == pytest.approx(1e-6)
    assert trl_replay.advantage_gap(ours, rows, [0.0, 0.5, 0.0, -0.5]) == pytest.approx(1.0)  # a wrong sign shows
    with pytest.raises(RuntimeError, match="same completions|pairing"):
        trl_replay.advantage_gap(ours, [["b", [3]], ["a", [2]], ["b", [4]], ["a", [1]]], [0.0] * 4)


def test_a_table_names_the_params_file_a_run_was_given(tmp_path):
    import machine

    root = Path(__file__).resolve().parents[1]
    assert machine.params_name("params.yaml") == "default params.yaml"
    assert machine.params_name(str(root / "params.yaml")) == "default params.yaml"
    other = tmp_path / "gpu.yaml"
    assert machine.params_name(str(other)) == f"params {other}"
    meta, rows, table = _roofline_run()  # made up, not a measured results file (a new run may rewrite one)
    assert "default params.yaml" in roofline.render(meta, rows, table)  # a roofline.json from before "params"
    md = roofline.render(meta | {"params": str(other)}, rows, table)
    assert f"params {other}" in md and "default params.yaml" not in md


def test_overhead_is_against_the_bare_loop_with_and_without_the_run_s_last_checkpoint():
    """bench_overhead: each arm's means over its repeats; the flow's overhead per round, and per round less the wait
    for the run's last checkpoint (once per run, like the warm-up: more rounds thin it out)."""
    def rnd(round_s, **kw):
        return {"round_s": round_s, "sample_s": 1.0, "score_s": 1.0, "update_s": 2.0, "rest_s": round_s - 4.0,
                "reward": 0.5, **kw}

    runs = [{"arm": "bare", "repeat": r, "round_wall_s": 4.0 + 0.2 * r, "warm_s": 10.0,
             "rounds": [rnd(4.0 + 0.2 * r)] * 4} for r in range(2)]
    runs += [{"arm": "flow", "repeat": r, "round_wall_s": 5.0 + 0.2 * r, "warm_s": 11.0, "server_cpu_s": 0.2,
              "last_write_wait_s": 2.0 + r, "rounds": [rnd(4.3 + 0.2 * r, checkpoint_s=0.5)] * 4} for r in range(2)]
    arms = bench_overhead.summarize(runs, ["bare", "flow"], rounds=4)
    bare, flow = arms["bare"], arms["flow"]
    assert bare["round_wall_s"] == pytest.approx(4.1) and bare["overhead_pct"] is None
    assert flow["round_wall_s"] == pytest.approx(5.1) and flow["last_write_wait_s"] == pytest.approx(2.5)
    assert flow["round_wall_less_last_s"] == pytest.approx(5.1 - 2.5 / 4)
    assert flow["overhead_pct"] == pytest.approx(100 * (5.1 / 4.1 - 1))
    assert flow["overhead_less_last_pct"] == pytest.approx(100 * ((5.1 - 0.625) / 4.1 - 1))
    meta = {"date": "2026-12-07", "machine": "2 CPU cores", "rounds": 4, "repeats": 2}
    md = bench_overhead.render(meta, arms, "default params.yaml")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["bare"].startswith("| bare | 4.10 | - | 4.10 | - | 1.00 |")
    assert rows["flow"].startswith("| flow | 5.10 | +24.4 % | 4.47 | +9.1 % | 1.00 |")
    assert "4 rounds x 2 repeat(s), default params.yaml" in md
