"""stages.advantage: LOO in polars == torch == a plain loop, every estimator by hand, the CLI and its errors."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest
import torch

from stages.advantage import compute_advantages, loo_baseline, rloo_polars, rloo_torch, rloo_torch_grouped
from stages.errors import PipelineError
from stages.params import AdvantageParams

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6


def scores(pids: list[str], idxs: list[int], rewards: list[float | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {"prompt_id": pids, "sample_idx": idxs, "rlhf_reward": rewards},
        schema={"prompt_id": pl.String, "sample_idx": pl.Int32, "rlhf_reward": pl.Float64},
    )


def grid(rewards: list[list[float]]) -> pl.DataFrame:
    """rewards[p][k] -> a scores table, prompt-major."""
    rows = [(f"p{p}", k, r) for p, rs in enumerate(rewards) for k, r in enumerate(rs)]
    return scores(*map(list, zip(*rows)))


def loo_loop(pids: list[str], rewards: list[float]) -> list[float]:
    """The reference: leave-one-out advantages with plain Python loops."""
    members = defaultdict(list)
    for i, p in enumerate(pids):
        members[p].append(i)
    adv = [0.0] * len(rewards)
    for idx in members.values():
        total = sum(rewards[i] for i in idx)
        for i in idx:
            adv[i] = 0.0 if len(idx) == 1 else rewards[i] - (total - rewards[i]) / (len(idx) - 1)
    return adv


def random_scores(num_prompts: int, k: int, drop: float, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = [(f"p{p:03d}", s, rng.gauss(3.0, 2.0)) for p in range(num_prompts) for s in range(k)]
    rows = [row for row in rows if rng.random() >= drop]
    rows += [("solo", 0, 1.5)]  # a group of one, always
    rng.shuffle(rows)  # groups interleaved, as after a join
    return scores(*map(list, zip(*rows)))


def run(df: pl.DataFrame, **kw) -> tuple[pl.DataFrame, dict, dict]:
    return compute_advantages(df, AdvantageParams(**kw), None)


# ---------------------------------------------------------------- leave-one-out


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_polars_torch_and_loop_agree(drop):
    df = random_scores(num_prompts=40, k=6, drop=drop, seed=int(drop * 10))
    pids, rewards = df["prompt_id"].to_list(), df["rlhf_reward"].to_list()
    expected = loo_loop(pids, rewards)

    polars_adv = compute_advantages(df, AdvantageParams(), None)[0]["advantage"].to_list()
    assert polars_adv == pytest.approx(expected, abs=TOL)
    assert rloo_polars(df)["advantage"].to_list() == pytest.approx(polars_adv, abs=1e-12)  # the stage path = the benchmarked kernel (sum order may differ)

    group = torch.from_numpy(df["prompt_id"].rank("dense").cast(pl.Int64).to_numpy() - 1)  # (N,)
    r = torch.tensor(rewards, dtype=torch.float64)
    _, grouped_adv = rloo_torch_grouped(r, group)
    assert grouped_adv.tolist() == pytest.approx(expected, abs=TOL)

    # Padded (num_prompts, K) tensor with a mask: the layout of an update batch.
    padded = df.with_columns(row=pl.int_range(pl.len())).sort("prompt_id", "sample_idx")
    gid = padded["prompt_id"].rank("dense").cast(pl.Int64).to_list()
    slot = padded.select(pl.int_range(pl.len()).over("prompt_id"))[:, 0].to_list()
    rew, mask = torch.zeros(max(gid), 6, dtype=torch.float64), torch.zeros(max(gid), 6, dtype=torch.bool)
    for g, s, x in zip(gid, slot, padded["rlhf_reward"]):
        rew[g - 1, s], mask[g - 1, s] = x, True
    _, padded_adv = rloo_torch(rew, mask)
    by_row = dict(zip(padded["row"], padded_adv[mask].tolist()))
    assert [by_row[i] for i in range(df.height)] == pytest.approx(expected, abs=TOL)
    assert padded_adv[~mask].abs().max() == 0


def test_equal_groups_tensor_matches_polars_and_identity():
    k, torch_rewards = 5, torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 7
    df = grid(torch_rewards.tolist())
    out = compute_advantages(df, AdvantageParams(), None)[0]
    baseline, adv = rloo_torch(torch_rewards)  # (30, K)
    assert out["advantage"].to_list() == pytest.approx(adv.flatten().tolist(), abs=TOL)
    assert out["baseline"].to_list() == pytest.approx(baseline.flatten().tolist(), abs=TOL)
    # Within a group: advantages sum to 0 and equal K/(K-1) * (r - mean).
    assert adv.sum(dim=1).abs().max() < TOL
    identity = k / (k - 1) * (torch_rewards - torch_rewards.mean(dim=1, keepdim=True))
    assert torch.allclose(adv, identity, atol=TOL)
    sums = out.group_by("prompt_id").agg(pl.col("advantage").sum())["advantage"]
    assert sums.abs().max() < TOL


def test_worked_example_three_prompts_k4():
    flat = [1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # completion-major: 1st completion of p0, p1, p2, then 2nd ...
    num_prompts, k = 3, 4
    pids, idxs = [f"p{i % num_prompts}" for i in range(12)], [i // num_prompts for i in range(12)]
    df = scores(pids, idxs, [float(x) for x in flat])
    out = compute_advantages(df, AdvantageParams(estimator="rloo"), None)[0]
    first_p0 = out.filter(prompt_id="p0", sample_idx=0)["advantage"].item()
    third_p1 = out.filter(prompt_id="p1", sample_idx=2)["advantage"].item()
    assert first_p0 == pytest.approx(1 - (2 + 5 + 8) / 3, abs=TOL) == pytest.approx(-4, abs=TOL)
    assert third_p1 == pytest.approx(6 - (2 + 3 + 9) / 3, abs=TOL) == pytest.approx(4 / 3, abs=TOL)

    rewards = torch.tensor(flat, dtype=torch.float64).view(k, num_prompts).T  # (num_prompts, K)
    _, adv = rloo_torch(rewards)
    assert adv[0, 0].item() == pytest.approx(-4, abs=TOL)
    assert adv[1, 2].item() == pytest.approx(4 / 3, abs=TOL)
    assert out["prompt_id"].to_list() == df["prompt_id"].to_list()  # input order kept
    for row in out.iter_rows(named=True):
        p, s = int(row["prompt_id"][1:]), row["sample_idx"]
        group = rewards[p].tolist()
        assert row["advantage"] == pytest.approx(k / (k - 1) * (row["rlhf_reward"] - statistics.fmean(group)), abs=TOL)
        assert adv[p, s].item() == pytest.approx(row["advantage"], abs=TOL)


def test_group_of_one_gets_zero_and_is_counted():
    df = scores(["a", "a", "a", "b", "c", "c"], [0, 1, 2, 0, 0, 1], [1.0, 2.0, 6.0, 9.0, 4.0, 2.0])
    for est in ("rloo", "grpo"):
        out, _, stats = run(df, estimator=est)
        solo = out.filter(prompt_id="b")
        assert solo["advantage"].item() == 0.0
        assert stats["singleton_groups"] == 1 and stats["groups"] == 3 and stats["rows"] == 6
    out = run(df)[0]
    assert out.filter(prompt_id="b")["baseline"].item() == 9.0
    assert out.filter(prompt_id="a")["advantage"].to_list() == pytest.approx([-3.0, -1.5, 4.5])  # own n = 3
    assert out.filter(prompt_id="c")["advantage"].to_list() == pytest.approx([2.0, -2.0])  # own n = 2
    # a round that `score.on_invalid: drop` left one completion a prompt (the flow's, sampled with k >= 2): every
    # completion gets advantage 0, as the singletons above do, where a table given to the stage is refused
    one_each = scores(["a", "b", "c"], [0, 1, 0], [1.0, 2.0, 3.0])
    for est in ("rloo", "grpo"):
        out, _, stats = compute_advantages(one_each, AdvantageParams(estimator=est), None, singletons_ok=True)
        assert out["advantage"].to_list() == [0.0, 0.0, 0.0] and stats["singleton_groups"] == 3
        with pytest.raises(PipelineError, match="every prompt has one completion"):
            compute_advantages(one_each, AdvantageParams(estimator=est), None)


def test_loo_expression_handles_huge_offset():
    # Rewards near 1e8 with unit spread: the LOO difference must survive (no E[x^2]-mean^2 style cancellation).
    df = scores(["a"] * 3, [0, 1, 2], [1e8 + 1, 1e8 + 2, 1e8 + 3])
    adv = df.select(pl.col("rlhf_reward") - loo_baseline())[:, 0].to_list()
    assert adv == pytest.approx([-1.5, 0.0, 1.5], abs=1e-6)
    out = run(df, estimator="grpo")[0]
    assert out["advantage"].to_list() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], abs=1e-6)


# ---------------------------------------------------------------- the other estimators, over rounds

ROUNDS = [  # rewards[p][k] per round; the rounds differ in size so row weighting matters
    [[1.0, 3.0], [2.0, 6.0]],
    [[0.0, 4.0, 5.0]],
    [[7.0, 1.0], [2.0, 2.0], [3.0, 9.0]],
]


def flat(rnd: list[list[float]]) -> list[float]:
    return [r for group in rnd for r in group]


def over_rounds(**kw) -> list[pl.DataFrame]:
    """Run every round, carrying the state through JSON as the caller would."""
    state, outs = None, []
    for rnd in ROUNDS:
        out, state, stats = compute_advantages(grid(rnd), AdvantageParams(**kw), state)
        state = json.loads(json.dumps(state))
        assert stats["rows"] == out.height and out["estimator"].unique().to_list() == [kw.get("estimator", "rloo")]
        outs.append(out)
    return outs


def check_baselines(outs: list[pl.DataFrame], baselines: list[float]) -> None:
    for out, rnd, b in zip(outs, ROUNDS, baselines):
        assert out["baseline"].to_list() == pytest.approx([b] * len(flat(rnd)), abs=TOL)
        assert out["advantage"].to_list() == pytest.approx([r - b for r in flat(rnd)], abs=TOL)


def test_reinforce():
    check_baselines(over_rounds(estimator="reinforce"), [0.0, 0.0, 0.0])


def test_batch_mean():
    check_baselines(over_rounds(estimator="batch_mean"), [statistics.fmean(flat(r)) for r in ROUNDS])


def test_moving_average_all_rounds():
    seen, expected = [], []
    for rnd in ROUNDS:
        seen += flat(rnd)
        expected.append(statistics.fmean(seen))  # every past row and this round's, row-weighted
    assert expected == pytest.approx([3.0, 21 / 7, 45 / 13])
    check_baselines(over_rounds(estimator="moving_average"), expected)


def test_moving_average_window():
    r = [flat(x) for x in ROUNDS]
    expected = [statistics.fmean(r[0]), statistics.fmean(r[0] + r[1]), statistics.fmean(r[1] + r[2])]
    check_baselines(over_rounds(estimator="moving_average", window=2), expected)


def test_ema():
    alpha, means = 0.75, [statistics.fmean(flat(r)) for r in ROUNDS]
    b1 = means[0]  # first round starts at its own mean
    b2 = alpha * b1 + (1 - alpha) * means[1]
    b3 = alpha * b2 + (1 - alpha) * means[2]
    check_baselines(over_rounds(estimator="ema", alpha=alpha), [b1, b2, b3])


def test_grpo_unbiased_std():
    eps = 1e-4
    for out, rnd in zip(over_rounds(estimator="grpo", epsilon=eps), ROUNDS):
        expected, baselines = [], []
        for group in rnd:
            m, sd = statistics.fmean(group), statistics.stdev(group)  # unbiased, like torch.std
            expected += [(r - m) / (sd + eps) for r in group]
            baselines += [m] * len(group)
        assert out["advantage"].to_list() == pytest.approx(expected, abs=TOL)
        assert out["baseline"].to_list() == pytest.approx(baselines, abs=TOL)


@pytest.mark.parametrize("estimator", ["rloo", "ema"])
def test_normalize_advantages(estimator):
    raw = over_rounds(estimator=estimator)
    for out, plain in zip(over_rounds(estimator=estimator, normalize_advantages=True), raw):
        a = plain["advantage"].to_list()
        m, sd = statistics.fmean(a), statistics.stdev(a)
        assert out["advantage"].to_list() == pytest.approx([(x - m) / (sd + 1e-4) for x in a], abs=TOL)
        assert out["baseline"].to_list() == plain["baseline"].to_list()


def test_whitening_leaves_float_noise_small_as_trl_does():
    """TRL 1.16's eps (1e-4): rewards equal but for float noise stay near 0 after whitening (1e-8 made them +-0.83)."""
    noise = scores(["a", "a", "b", "b"], [0, 1, 0, 1], [1.0, 1.0 + 2e-7, 3.0, 3.0 - 2e-7])
    out, _, _ = compute_advantages(noise, AdvantageParams(normalize_advantages=True), None)
    a = torch.tensor(out["advantage"].to_list(), dtype=torch.float64)
    raw = torch.tensor([-2e-7, 2e-7, 2e-7, -2e-7], dtype=torch.float64)  # rloo's advantages of that table
    trl = (raw - raw.mean()) / (raw.std() + 1e-4)  # trl/trainer/rloo_trainer.py's whitening
    assert a.abs().max() < 1e-2 and torch.allclose(a, trl, atol=1e-6)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "batch_mean", "ema"])
def test_unscored_rows_are_left_out_of_the_baselines_with_advantage_0_as_trl_does(estimator):
    """A row whose rlhf_reward is null (every reward returned None): in no baseline, mean, state or whitening, its
    advantage 0 and baseline null (TRL 1.16's RLOOTrainer: NaN rewards, nan-aware baselines, nan_to_num); the
    others' advantages as if it were not there; the input's order kept."""
    full = scores(["a", "a", "a", "b", "b"], [0, 1, 2, 0, 1], [None, 1.0, 3.0, 2.0, None]).with_columns(
        sample_digest=pl.Series(["d0", "d1", "d2", "d3", "d4"]))  # carried through, in its place
    alone = full.filter(pl.col("rlhf_reward").is_not_null())
    for norm in (False, True):
        p = AdvantageParams(estimator=estimator, normalize_advantages=norm)
        out, state, stats = compute_advantages(full, p, None, singletons_ok=True)
        want, want_state, _ = compute_advantages(alone, p, None, singletons_ok=True)
        assert out.select("prompt_id", "sample_idx").rows() == full.select("prompt_id", "sample_idx").rows()
        assert out["advantage"].to_list() == [0.0, *want["advantage"].to_list(), 0.0]
        assert out["baseline"].to_list() == [None, *want["baseline"].to_list(), None]
        assert out["rlhf_reward"].to_list() == full["rlhf_reward"].to_list() and out.columns == want.columns
        assert out["sample_digest"].to_list() == full["sample_digest"].to_list()
        assert state == want_state and stats["unscored"] == 2 and stats["rows"] == 3
    if estimator == "rloo":  # the review's case: None, 1, 1 under one prompt gave -1, 0.5, 0.5 (the None as 0)
        out, _, _ = compute_advantages(scores(["p"] * 3, [0, 1, 2], [None, 1.0, 1.0]), AdvantageParams(), None)
        assert out["advantage"].to_list() == [0.0, 0.0, 0.0]
    # unscored rows that leave every prompt one scored completion: the input's k is 2, so no "k < 2" refusal (it
    # stopped the run); each gets advantage 0, as TRL's 0/0 -> NaN -> 0
    thin = scores(["a", "a", "b", "b"], [0, 1, 0, 1], [1.0, None, 2.0, None])
    out, _, _ = compute_advantages(thin, AdvantageParams(estimator=estimator), None)
    if estimator in ("rloo", "grpo"):
        assert out["advantage"].to_list() == [0.0] * 4
    # a round no reward applied to at all: every advantage 0, the carried state as it was (it stopped the run, and
    # every rerun at the same round, before)
    none = scores(["a", "a", "b"], [0, 1, 0], [None, None, None])
    before = compute_advantages(scores(["z", "z"], [0, 1], [1.0, 3.0]), AdvantageParams(estimator=estimator), None)[1]
    out, state, stats = compute_advantages(none, AdvantageParams(estimator=estimator), before)
    assert out["advantage"].to_list() == [0.0] * 3 and out["baseline"].null_count() == 3
    assert state == {**before, "estimator": estimator} and (stats["unscored"], stats["rows"]) == (3, 0)


def test_whitening_leaves_out_a_group_of_one_as_trl_does():
    """rloo with a prompt that unscored rows left one completion: its advantage stays 0 and it is not in the
    whitening's mean and std (TRL 1.16: its leave-one-out baseline is 0/0 = NaN, whitened with nanmean/nanstd, then 0)."""
    df = scores(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 1, 0, 1], [1.0, None, 2.0, 0.0, 5.0, 3.0])
    out, _, _ = compute_advantages(df, AdvantageParams(estimator="rloo", normalize_advantages=True), None)
    raw = torch.tensor([float("nan"), float("nan"), 2.0, -2.0, 2.0, -2.0], dtype=torch.float64)
    kept = raw[~raw.isnan()]
    trl = torch.nan_to_num((raw - kept.mean()) / (kept.std() + 1e-4), nan=0.0)  # rloo_trainer.py's steps
    assert out["advantage"].to_list() == pytest.approx(trl.tolist(), abs=1e-12)


def test_state_is_small_json_and_validated():
    _, state, _ = run(grid(ROUNDS[0]), estimator="ema")
    assert set(state) == {"estimator", "ema", "round_sums", "round_counts", "round_means"}
    assert state["round_counts"] == [4] and state["ema"] == 3.0
    with pytest.raises(PipelineError, match="not an advantage state"):
        compute_advantages(grid(ROUNDS[1]), AdvantageParams(), {"ema": 1.0})
    # a carried number that is not one (NaN made every advantage NaN with exit 0; a string a traceback; JSON's true
    # a baseline of 1) is named in one line
    from stages.advantage import check_state

    for key, bad in (("ema", math.nan), ("ema", True), ("ema", "1"), ("round_sums", math.inf), ("round_sums", "x"),
                     ("round_means", None), ("round_means", False)):
        st = {**state, key: bad} if key == "ema" else {**state, key: [bad]}
        with pytest.raises(PipelineError) as exc:
            check_state(st, "st.json")
        want = "be a finite number or null" if key == "ema" else "hold finite numbers"
        assert str(exc.value).startswith(f"st.json: `{key}` must {want}, got {bad!r}; pass the state written"), key
    with pytest.raises(PipelineError, match="disagree"):
        check_state({**state, "round_counts": [True]})
    assert check_state({**state, "ema": 2, "round_sums": [12]}) == {**state, "ema": 2, "round_sums": [12]}  # ints


# ---------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.advantage", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_writes_advantages(tmp_path):
    df = random_scores(num_prompts=10, k=4, drop=0.2, seed=3).with_columns(score=pl.lit(1.0))  # extra col ignored
    src, out = tmp_path / "scores.parquet", tmp_path / "adv.parquet"
    df.write_parquet(src)
    proc = cli("--scores", str(src), "--out", str(out), "--estimator", "rloo", "--state-out", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr
    got = pl.read_parquet(out)
    assert got.columns == ["prompt_id", "sample_idx", "rlhf_reward", "baseline", "advantage", "estimator"]
    assert got.schema["advantage"] == pl.Float64 and got.schema["baseline"] == pl.Float64
    assert got.select("prompt_id", "sample_idx").equals(df.select("prompt_id", "sample_idx"))  # same order
    assert got["advantage"].to_list() == pytest.approx(loo_loop(df["prompt_id"].to_list(), df["rlhf_reward"].to_list()))
    assert set(got["estimator"]) == {"rloo"}
    assert json.loads((tmp_path / "s.json").read_text())["round_counts"] == [df.height]


def test_cli_carries_ema_state(tmp_path):
    """Two rounds with different means (3 and 4), so a CLI that ignored --state-in would give 4, not 3.1."""
    state = tmp_path / "state.json"
    rounds = [ROUNDS[0], ROUNDS[2]]
    for i, rnd in enumerate(rounds):
        grid(rnd).write_parquet(tmp_path / f"s{i}.parquet")
        extra = ["--state-in", str(state)] if i else []
        proc = cli("--scores", str(tmp_path / f"s{i}.parquet"), "--out", str(tmp_path / f"a{i}.parquet"),
                   "--estimator", "ema", "--state-out", str(state), *extra)
        assert proc.returncode == 0, proc.stderr
    m0, m1 = (statistics.fmean(flat(r)) for r in rounds)
    assert (m0, m1) == (3.0, 4.0)
    expected = 0.9 * m0 + 0.1 * m1  # alpha from params.yaml: 3.1
    assert pl.read_parquet(tmp_path / "a1.parquet")["baseline"].to_list() == pytest.approx([expected] * 6)



def test_cli_on_a_full_disk_is_one_line_and_keeps_the_earlier_output(tmp_path):
    """A real full filesystem (a 256 KiB tmpfs in a private mount namespace, filled up): the command ends with one
    `error: disk full ...` line and exit code 2, no traceback, the earlier output as it was and no temporary file left.
    Where this machine cannot make a mount namespace, test_runtime's in-process tests still cover the message."""
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare -rm); the in-process tests cover the message")
    src, full, keep = tmp_path / "scores.parquet", tmp_path / "full", tmp_path / "kept.parquet"
    random_scores(num_prompts=400, k=4, drop=0.0, seed=5).write_parquet(src)  # ~10 KB of advantages to write
    full.mkdir()
    earlier = grid([[1.0, 2.0]])
    earlier.write_parquet(tmp_path / "earlier.parquet")
    script = f"""
set -u
mount -t tmpfs -o size=256k tmpfs {full}
cp {tmp_path / "earlier.parquet"} {full}/adv.parquet
dd if=/dev/zero of={full}/fill bs=4k 2>/dev/null
{sys.executable} -m stages.advantage --scores {src} --out {full}/adv.parquet --estimator rloo \
    --state-out {full}/s.json 2>{tmp_path}/err.txt
echo $? > {tmp_path}/rc.txt
ls -A {full} > {tmp_path}/ls.txt
cp {full}/adv.parquet {keep}
"""
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = (tmp_path / "err.txt").read_text().strip().splitlines()
    assert (tmp_path / "rc.txt").read_text().strip() == "2", err
    assert len(err) == 1 and err[0].startswith(f"error: disk full writing {full}/"), err
    assert "No space left on device" in err[0] and " GiB free there; " in err[0] and "run the command again" in err[0]
    assert sorted((tmp_path / "ls.txt").read_text().split()) == ["adv.parquet", "fill"]  # no temporary file left
    assert pl.read_parquet(keep).equals(earlier)

BAD_INPUTS = {
    "missing_column": (lambda: grid([[1.0, 2.0]]).drop("rlhf_reward"), "rlhf_reward"),
    "duplicate_key": (lambda: scores(["a", "a", "b", "b"], [0, 1, 0, 0], [1.0, 2.0, 3.0, 4.0]), "duplicate"),
    "nan_reward": (lambda: scores(["a", "a", "b", "b"], [0, 1, 0, 1], [1.0, 2.0, math.nan, 4.0]), "'b' sample_idx=0"),
    "inf_reward": (lambda: scores(["a", "a", "b", "b"], [0, 1, 0, 1], [1.0, 2.0, 3.0, -math.inf]), "'b' sample_idx=1"),
    "all_singletons": (lambda: scores(["a", "b", "c"], [0, 0, 0], [1.0, 2.0, 3.0]), "k < 2 for rloo"),
    "empty": (lambda: scores([], [], []), "no rows"),
}

# the whole one-line message of each, in process (the CLI test below checks the exit and the files)
BAD_MESSAGES = {
    "missing_column": "s.parquet: missing column(s) ['rlhf_reward']; expected at least ['prompt_id', 'sample_idx', "
                      "'rlhf_reward']",
    "duplicate_key": "s.parquet: duplicate (prompt_id, sample_idx) = ('b', 0); keys must be unique",
    "nan_reward": "s.parquet: column `rlhf_reward` is nan at prompt_id='b' sample_idx=0 (1 row(s) NaN/inf); "
                  "fix the rewards or set score.on_invalid: drop",
    "inf_reward": "s.parquet: column `rlhf_reward` is -inf at prompt_id='b' sample_idx=1 (1 row(s) NaN/inf); "
                  "fix the rewards or set score.on_invalid: drop",
    "all_singletons": "s.parquet: every prompt has one completion (k < 2 for rloo, or the others dropped by "
                      "score.on_invalid: drop): the group baseline is undefined; sample k >= 2 per prompt or pick "
                      "reinforce|batch_mean|moving_average|ema",
    "empty": "s.parquet: no rows; run the score stage first or pass a non-empty scores table",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_one_line_naming_the_row(case):
    make, _ = BAD_INPUTS[case]
    with pytest.raises(PipelineError) as exc:
        compute_advantages(make(), AdvantageParams(estimator="rloo"), None, source="s.parquet")
    msg = str(exc.value)
    assert msg == BAD_MESSAGES[case]


def test_more_bad_input_and_what_is_not_bad():
    from stages.advantage import validate_scores

    nulls = scores(["a", None, "b", None], [0, 1, 0, 2], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(PipelineError) as exc:
        compute_advantages(nulls, AdvantageParams(estimator="reinforce"), None)
    assert str(exc.value) == "scores: null key in row (None, 1); every row needs prompt_id and sample_idx"
    with pytest.raises(PipelineError, match=r"^scores: no rows;"):
        validate_scores(scores([], [], []), "reinforce")
    with pytest.raises(PipelineError, match=r"^state: not an advantage state"):  # the carried state, by its role
        compute_advantages(scores(["a"], [0], [1.0]), AdvantageParams(estimator="reinforce"), {"ema": 1.0})
    twice = scores(["a", "a", "b", "b", "b"], [0, 1, 0, 1, 1], [1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(PipelineError, match=r"^scores: duplicate \(prompt_id, sample_idx\) = \('b', 1\)"):
        compute_advantages(twice, AdvantageParams(estimator="reinforce"), None)
    two_bad = scores(["a", "a", "b", "b"], [0, 1, 0, 1], [1.0, math.nan, 3.0, math.inf])
    with pytest.raises(PipelineError, match=r"is nan at prompt_id='a' sample_idx=1 \(2 row\(s\) NaN/inf\)"):
        compute_advantages(two_bad, AdvantageParams(estimator="reinforce"), None)
    # one completion per prompt is fine for a baseline that does not come from the group; one row is a table
    one_each = scores(["a", "b", "c"], [0, 0, 0], [1.0, 2.0, 3.0])
    for est in ("reinforce", "batch_mean", "moving_average", "ema"):
        out, _, stats = compute_advantages(one_each, AdvantageParams(estimator=est), None)
        assert out.height == 3 and stats["singleton_groups"] == 3, est
    out, _, _ = compute_advantages(one_each.head(1), AdvantageParams(estimator="reinforce"), None)
    assert out["advantage"].to_list() == [1.0]


def test_round_stats_by_hand():
    """Means and sample stds (n - 1) of the round; one row has no spread (0, not NaN)."""
    _, _, st = compute_advantages(scores(["a", "a"], [0, 1], [1.0, 3.0]), AdvantageParams(estimator="reinforce"), None)
    assert (st["reward_mean"], st["reward_std"], st["advantage_std"]) == (2.0, pytest.approx(math.sqrt(2)), pytest.approx(math.sqrt(2)))
    assert st == {"advantage_mean": 2.0, "advantage_std": pytest.approx(math.sqrt(2)), "baseline_mean": 0.0,
                  "reward_mean": 2.0, "reward_std": pytest.approx(math.sqrt(2)), "estimator": "reinforce", "rows": 2,
                  "groups": 1, "singleton_groups": 0, "normalized": False, "unscored": 0}
    _, _, st = compute_advantages(scores(["a", "a", "b", "c", "c"], [0, 1, 0, 0, 1], [1.0, 3.0, 2.0, 0.0, 4.0]),
                                  AdvantageParams(estimator="rloo"), None)
    assert (st["groups"], st["singleton_groups"], st["baseline_mean"]) == (3, 1, pytest.approx((3 + 1 + 2 + 4 + 0) / 5))
    _, _, st = compute_advantages(scores(["a"], [0], [5.0]), AdvantageParams(estimator="reinforce"), None)
    assert (st["reward_std"], st["advantage_std"], st["reward_mean"]) == (0.0, 0.0, 5.0)
    # normalized over a round of two: (a - mean) / std with the sample std
    out, _, _ = compute_advantages(scores(["a", "a"], [0, 1], [1.0, 3.0]),
                                   AdvantageParams(estimator="reinforce", normalize_advantages=True), None)
    assert out["advantage"].to_list() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)],
                                                       abs=1e-12)  # std sqrt(2) + TRL's eps
    assert compute_advantages(scores(["a", "a"], [0, 1], [1.0, 3.0]), AdvantageParams(estimator="reinforce",
                              normalize_advantages=True), None)[2]["normalized"] is True


@pytest.mark.parametrize("state,phrase", [
    ({"round_sums": [1.0], "round_counts": [1, 2], "round_means": [1.0]}, "round_sums/round_counts/round_means disagree"),
    ({"round_sums": [1.0], "round_counts": [0], "round_means": [1.0]}, "round_sums/round_counts/round_means disagree"),
    ({"round_sums": [1.0], "round_counts": ["4"], "round_means": [1.0]}, "round_sums/round_counts/round_means disagree"),
    ({"round_sums": [1.0], "round_counts": [1], "round_means": [1.0], "ema": "0.5"}, "`ema` must be a finite number or null, got '0.5'"),
])
def test_a_malformed_state_is_refused_and_says_how_to_fix_it(state, phrase):
    from stages.advantage import check_state

    with pytest.raises(PipelineError) as exc:
        check_state(state, "s.json")
    assert str(exc.value) == (f"s.json: {phrase}; pass the state written by the previous round (--state-out) or none "
                              "to start afresh")


def test_a_valid_state_and_the_fresh_one():
    from stages.advantage import check_state

    fresh = {"estimator": None, "ema": None, "round_sums": [], "round_counts": [], "round_means": []}
    assert check_state(None) == fresh
    one = {"round_sums": [3.0], "round_counts": [1], "round_means": [3.0]}  # a round of one row is a valid round
    assert check_state(one) == {**fresh, **one}
    assert check_state({**one, "ema": 2, "estimator": "ema"})["ema"] == 2


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, case):
    make, needle = BAD_INPUTS[case]
    src, out = tmp_path / "scores.parquet", tmp_path / "adv.parquet"
    make().write_parquet(src)
    out.write_bytes(b"previous round's file")
    before = os.stat(out).st_mtime_ns
    proc = cli("--scores", str(src), "--out", str(out), "--estimator", "rloo", "--state-out", str(tmp_path / "s.json"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0] and str(src) in lines[0]
    assert out.read_bytes() == b"previous round's file" and os.stat(out).st_mtime_ns == before
    assert not (tmp_path / "s.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adv.parquet", "scores.parquet"]  # no temp files left


def test_cli_params_come_from_the_file_with_the_estimator_override_or_the_defaults(tmp_path, monkeypatch):
    from stages.advantage import resolve_params
    from stages.params import load_params

    repo = Path(__file__).resolve().parents[1] / "params.yaml"
    from_file = load_params(repo).advantage
    assert resolve_params(str(repo), None) == from_file
    override = resolve_params(str(repo), "grpo" if from_file.estimator != "grpo" else "rloo")
    assert override.estimator != from_file.estimator
    assert override.model_dump(exclude={"estimator"}) == from_file.model_dump(exclude={"estimator"})
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults
    assert resolve_params(None, None) == AdvantageParams()
    assert resolve_params(None, "ema") == AdvantageParams(estimator="ema")
    (tmp_path / "params.yaml").write_text((repo.read_text()).replace("estimator: rloo", "estimator: batch_mean"))
    assert resolve_params(None, None).estimator == "batch_mean"  # the default file, when present, is read


def test_torch_k2_and_k1_by_hand():
    base, adv = rloo_torch(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))  # K = 2: the other sample is the baseline
    assert base.tolist() == [[3.0, 1.0], [2.0, 2.0]] and adv.tolist() == [[-2.0, 2.0], [0.0, 0.0]]
    base, adv = rloo_torch(torch.tensor([[0.5], [-1.0]]))  # K = 1: no other sample, advantage 0
    assert base.tolist() == [[0.5], [-1.0]] and adv.tolist() == [[0.0], [0.0]] and adv.shape == (2, 1)


def test_polars_groups_by_the_column_it_is_given():
    df = pl.DataFrame({"prompt_id": ["a", "a", "a", "a"], "g": ["x", "x", "y", "y"], "r": [1.0, 3.0, 5.0, 9.0]})
    out = rloo_polars(df, "r", "g")  # prompt_id is one group; g splits it in two
    assert out["baseline"].to_list() == [3.0, 1.0, 9.0, 5.0] and out["advantage"].to_list() == [-2.0, 2.0, -4.0, 4.0]


def test_cli_without_a_params_file_says_it_uses_the_defaults(tmp_path, monkeypatch, caplog):
    import logging

    from stages.advantage import resolve_params

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="stages.advantage"):
        resolve_params(None, None)
    assert [r.getMessage() for r in caplog.records] == ["no params.yaml here: using the default advantage params"]
