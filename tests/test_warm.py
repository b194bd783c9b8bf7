"""What a run keeps warm (stages/loop/warm.py) and the first round's reference (stages/loop/steps.py): in-process,
on a tiny prepared project with the transformers sampler.

- A fresh run from the reference's own weights: round 1's policy is the reference, bit for bit, so the round runs
  no reference pass and its KL is exactly 0; from round 2 on the reference pass runs and the KL is the real one.
- A fresh run whose policy (`base.model_dir`) is another model than the reference (`score.ref_model`): the engine
  starts on the reference's weights (for the held-out baseline) and must sample the policy's from round 1 on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from project import PY, make_project, run, run_env

from stages.errors import PipelineError
from stages.logprobs import token_logprobs


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch):
    def make(**overrides):
        proj = make_project(tmp_path, tiny_model_dir, **{"sample.backend": "hf", "train.eval_every": 0, **overrides})
        run([PY, "-m", "stages.prepare"], proj, run_env(tmp_path))
        monkeypatch.chdir(proj)
        from stages.params import load_params

        return load_params("params.yaml")
    return make


def _warm(params):
    from stages.loop.warm import load_warm
    from stages.runtime import configure_env

    configure_env(params.base.threads)
    return load_warm(params, 2)


def _round(w, r):
    from stages.loop import steps
    from stages.loop.resume import round_prompts

    prompts = round_prompts(w.train_prompts, r, w.params.train.prompts_per_round, w.params.base.seed)
    samples, _ = steps.sample_round(w, r, prompts)
    return samples


def _is_ref(w, model) -> bool:
    """`model` is the reference: itself, or its bf16 view (`Warm.ref_bf16`), which the rounds' bf16 pass runs."""
    return model is w.ref or (w.ref_bf16 is not None and model is w.ref_bf16)


def _ref_passes(monkeypatch, w) -> list:
    """Record every logprob pass the score stage runs on the reference model (or its bf16 view, `Warm.ref_bf16`)."""
    import stages.score

    calls, real = [], stages.score.sequence_logprobs

    def spy(model, *args, **kwargs):
        calls.append(_is_ref(w, model))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(stages.score, "sequence_logprobs", spy)
    return calls


@pytest.mark.parametrize("choice", ["auto", "sampler", "update", "trainer"])
@pytest.mark.parametrize("exact", [True, False])  # an fp32 engine's logprobs are the policy's own; a bf16 one's not
@pytest.mark.parametrize("temperature", [1.0, 0.7])  # the engine's logprobs are before temperature, the KL's after
def test_a_round_asks_the_engine_for_logprobs_exactly_where_its_kl_reads_them(choice, exact, temperature):
    """`round_uses_sampler_logprobs` (what `sample_round` asks for) against `resolve_policy_logprobs` (what the round's
    scoring then reads), for every `score.policy_logprobs` and both kinds of engine, at any round size; at a
    temperature other than 1 `auto` never takes the engine's raw logprobs and params refuse `sampler`."""
    from types import SimpleNamespace

    from conftest import repo_params
    from stages.loop import steps

    if choice == "sampler" and temperature != 1.0:
        with pytest.raises(PipelineError, match="score.policy_logprobs: sampler needs sample.temperature 1.0"):
            repo_params(score={"policy_logprobs": choice}, sample={"temperature": temperature})
        return
    params = repo_params(score={"policy_logprobs": choice}, sample={"temperature": temperature})
    w = SimpleNamespace(params=params, sampler=SimpleNamespace(exact_logprobs=exact))
    asks = steps.round_uses_sampler_logprobs(w)
    assert asks == (choice == "sampler" or (choice == "auto" and exact and temperature == 1.0))
    for rows in (1, 32, 512):
        reads = steps.resolve_policy_logprobs(params, rows, exact, True, 32, False) == "sampler"
        assert reads == asks


@pytest.mark.parametrize("sample_dtype", ["float32", "bfloat16"])  # the policy's logprobs: the sampler's / a pass
def test_the_first_round_of_a_fresh_run_has_kl_zero_without_a_reference_pass(project, monkeypatch, sample_dtype):
    from stages.loop import steps
    from stages.logprobs import sequence_logprobs
    from stages.runtime import score_dtype

    w = _warm(project(**{"sample.dtype": sample_dtype}))
    try:
        assert w.policy_is_ref  # the trainer was loaded from the reference's weights
        calls = _ref_passes(monkeypatch, w)
        asked, generate = [], w.sampler.generate  # the round asks the engine for logprobs only where it uses them
        monkeypatch.setattr(w.sampler, "generate", lambda ids, cfg, seeds: asked.append(cfg.logprobs) or
                            generate(ids, cfg, seeds))
        samples = _round(w, 0)
        assert asked == [sample_dtype == "float32"] == [steps.round_uses_sampler_logprobs(w)]
        scores, _ = steps.score_round(w, samples)
        assert True not in calls  # no reference pass in round 1
        assert scores["kl"].to_list() == [0.0] * scores.height
        assert scores["logp_ref"].to_list() == scores["logp_policy"].to_list()
        # the skipped pass would have given the same numbers to rounding: the policy is the reference (an fp32
        # sampler's logprobs are the fp32 pass's; a bf16 sampler's are replaced by the update's own forward in
        # score.dtype, the whole round in one batch: a bf16 pass's logprobs depend on the batch's padding)
        from stages.score import completion_inputs

        p, c = completion_inputs(samples, w.tokenizer)
        dtype = "float32" if w.sampler.exact_logprobs else score_dtype(w.params.score.dtype)
        assert w.sampler.exact_logprobs == (sample_dtype == "float32")
        whole = steps.policy_logprobs_source(w) == "update"
        assert whole == (sample_dtype == "bfloat16")
        batch = samples.height if whole else w.params.score.batch_size
        lp, _ = sequence_logprobs(w.ref, p, c, w.tokenizer.pad_token_id, batch, dtype=dtype)
        assert lp == pytest.approx(scores["logp_policy"].to_list(), abs=1e-3)

        adv, _, _ = steps.advantage_round(w, scores)
        steps.update_round(w, samples, adv)
        samples = _round(w, 1)
        scores, _ = steps.score_round(w, samples)
        assert True in calls  # round 2: the policy has moved, the reference pass runs
        assert any(k != 0.0 for k in scores["kl"].to_list())
        # on its bf16 view where the run keeps one (bf16 scoring on a CPU): the reference's own numbers, to the bit
        assert (w.ref_bf16 is not None) == (score_dtype(w.params.score.dtype) == "bfloat16")
        p, c = completion_inputs(samples, w.tokenizer)
        ref_lp, _ = sequence_logprobs(w.ref, p, c, w.tokenizer.pad_token_id, batch,
                                      dtype=score_dtype(w.params.score.dtype))
        assert scores["logp_ref"].to_list() == ref_lp
    finally:
        w.sampler.close()


def test_a_policy_from_another_dir_than_the_reference_samples_from_round_one(project, tiny_model_factory, tmp_path,
                                                                            monkeypatch):
    from stages.loop import steps
    from stages.score import completion_inputs

    ref_dir = tiny_model_factory(tmp_path / "reference", seed=1)  # same shapes, other weights
    # an fp32 sampler: its logprobs are the policy's own to 1e-3, so they say which weights it holds
    w = _warm(project(**{"score.ref_model": str(ref_dir), "sample.dtype": "float32"}))
    try:
        assert not w.policy_is_ref
        calls = _ref_passes(monkeypatch, w)
        samples = _round(w, 0)
        p, c = completion_inputs(samples, w.tokenizer)
        with torch.no_grad():
            pol, *_ = token_logprobs(w.trainer.model, p, c, w.tokenizer.pad_token_id)
            ref, *_ = token_logprobs(w.ref, p, c, w.tokenizer.pad_token_id)
        got = [sum(x) for x in samples["sampler_logprobs"]]
        assert got == pytest.approx(pol.sum(-1).tolist(), abs=1e-3)  # the policy's completions, not the reference's
        assert got != pytest.approx(ref.sum(-1).tolist(), abs=1e-3)
        scores, _ = steps.score_round(w, samples)
        assert True in calls and any(k != 0.0 for k in scores["kl"].to_list())
    finally:
        w.sampler.close()


def test_same_weights_is_one_function_not_one_dir(tiny_model_dir, tiny_model_factory, tmp_path):
    import json
    import shutil

    from stages.models import load_causal_lm, same_weights

    a = load_causal_lm(tiny_model_dir)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    b = load_causal_lm(copy)
    b.config.use_cache = False  # a run-time switch: the trainer sets it
    assert same_weights(a, b)  # a copy in another dir is the same function

    last = list(b.state_dict())[-1]
    with torch.no_grad():
        b.state_dict()[last].view(-1)[-1] += 1e-6  # one element of the last tensor
    assert not same_weights(a, b)
    assert not same_weights(a, load_causal_lm(tiny_model_dir, "bfloat16"))  # another dtype

    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] *= 10  # the same weights, another function
    (copy / "config.json").write_text(json.dumps(cfg))
    c = load_causal_lm(copy)
    assert c.state_dict().keys() == a.state_dict().keys()
    assert not same_weights(a, c)
    assert not same_weights(a, load_causal_lm(tiny_model_factory(tmp_path / "other", seed=1)))


def _passes(monkeypatch, w) -> list:
    """Record every logprob pass the score stage runs: (which model, its batch size)."""
    import stages.score

    calls, real = [], stages.score.sequence_logprobs

    def spy(model, prompts, completions, pad, batch_size=16, *args, **kwargs):
        calls.append(("ref" if _is_ref(w, model) else "policy", batch_size))
        return real(model, prompts, completions, pad, batch_size, *args, **kwargs)
    monkeypatch.setattr(stages.score, "sequence_logprobs", spy)
    return calls


def _forwards(w) -> list:
    """Record every forward the trainer runs (the update's, and any run for scoring)."""
    calls, real = [], w.trainer._logp

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)
    w.trainer._logp = spy
    return calls


def test_the_update_s_own_forward_gives_the_kl_its_policy_logprobs(project, monkeypatch):
    """A bf16 engine's logprobs are not the policy's; with the round in one micro-batch the update's forward, run
    at scoring time and kept for the update, gives them: no policy pass, the reference pass batched as that forward
    (a bf16 pass's logprobs depend on the batch's padding), one forward a round in all, and the advantages those of a
    separate policy pass to the README's tolerance."""
    from stages.loop import steps
    from stages.logprobs import sequence_logprobs
    from stages.runtime import score_dtype
    from stages.score import completion_inputs

    w = _warm(project(**{"sample.dtype": "bfloat16"}))
    try:
        assert not w.sampler.exact_logprobs
        passes, forwards = _passes(monkeypatch, w), _forwards(w)
        samples = _round(w, 0)
        n = samples.height
        assert steps.policy_logprobs_for(w, n) == steps.policy_logprobs_source(w) == "update"
        scores, stats = steps.score_round(w, samples)
        assert passes == [] and forwards == [n]  # round 1: the policy is the reference, the kept forward is both
        assert scores["kl"].to_list() == [0.0] * n and stats["time/policy_forward_s"] > 0
        adv, w.adv_state, _ = steps.advantage_round(w, scores)
        steps.update_round(w, samples, adv)
        assert forwards == [n]  # the update took the kept forward

        samples = _round(w, 1)
        kept = w.params
        w.params = kept.model_copy(update={"score": kept.score.model_copy(update={"policy_logprobs": "trainer"})})
        scores_sep, _ = steps.score_round(w, samples)
        adv_sep, _, _ = steps.advantage_round(w, scores_sep)
        w.params = kept
        del passes[:]
        scores, _ = steps.score_round(w, samples)
        assert passes == [("ref", n)] and forwards == [n, n]
        p, c = completion_inputs(samples, w.tokenizer)
        dtype = score_dtype(w.params.score.dtype)
        same_batch, _ = sequence_logprobs(w.trainer.model, p, c, w.tokenizer.pad_token_id, n, dtype=dtype)
        assert scores["logp_policy"].to_list() == pytest.approx(same_batch, abs=1e-4)
        diff = (scores["logp_policy"] - scores_sep["logp_policy"]).abs()
        assert diff.mean() < 0.3  # the README's KL tolerance (tests/test_precision.py)
        adv, w.adv_state, _ = steps.advantage_round(w, scores)
        assert (adv["advantage"] - adv_sep["advantage"]).abs().max() < 0.1
        steps.update_round(w, samples, adv)
        assert forwards == [n, n]
    finally:
        w.sampler.close()


def test_an_explicit_update_forward_that_cannot_be_is_refused_before_loading_the_rest(project):
    from stages.errors import PipelineError

    params = project(**{"score.policy_logprobs": "update", "update.gradient_accumulation_steps": 2})
    with pytest.raises(PipelineError, match=r"score.policy_logprobs: update needs .* micro-batches of .*"
                                            r"update.gradient_accumulation_steps 2\); set it to auto"):
        _warm(params)


def test_a_missing_prepared_table_names_the_command_that_writes_it(project):
    """Prepared data deleted (or never made by a `python -m flows.train` run alone): one line naming the prepare
    command, not the generic 'run the stage that writes it'."""
    from stages.errors import PipelineError

    params = project()
    Path("data/prepared/eval.parquet").unlink()
    with pytest.raises(PipelineError) as e:
        from stages.loop.warm import load_warm

        load_warm(params, 2, with_eval=True)
    assert str(e.value) == ("data/prepared/eval.parquet: not found; prepare the prompts first: "
                            "python -m stages.prepare (`dvc repro` does it)")


@pytest.mark.parametrize("sample_dtype", ["float32", "bfloat16"])
def test_held_out_sampling_asks_for_logprobs_only_where_they_replace_a_pass(project, monkeypatch, sample_dtype):
    """The in-training evaluation: the reference's held-out completions (made at load) never need the engine's
    logprobs; the policy's need them where they are exact (an fp32 engine's replace its logprob pass)."""
    from stages.loop import steps
    from stages.loop.warm import load_warm
    from stages.sample.hf_backend import HFSampler

    asked, generate = [], HFSampler.generate
    monkeypatch.setattr(HFSampler, "generate", lambda self, ids, cfg, seeds: asked.append((cfg.k, cfg.logprobs)) or
                        generate(self, ids, cfg, seeds))
    params = project(**{"sample.dtype": sample_dtype, "train.eval_every": 1})
    w = load_warm(params, 2, with_eval=True)
    try:
        metrics = steps.evaluate_round(w, 0)
        exact = sample_dtype == "float32"
        assert w.sampler.exact_logprobs == exact
        assert asked == [(1, False), (1, exact)]
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-3)  # the untrained policy is the reference
    finally:
        w.sampler.close()


def test_the_engine_gets_each_updates_weights_before_it_next_generates_and_not_after_the_last(project, monkeypatch):
    """`update_round` leaves the push to the engine's next use (`steps.sync_sampler`): one push per update, made by
    an evaluation or the next round's sampling (which reports its time), none where the engine already has the
    weights, and none for a last update that nothing generates after; what the engine then holds is the trainer's."""
    import torch

    from stages.loop import steps
    from stages.loop.warm import load_warm

    w = load_warm(project(**{"train.eval_every": 1}), 3, with_eval=True)
    try:
        pushes, real = [], w.sampler.update_weights
        monkeypatch.setattr(w.sampler, "update_weights", lambda **kw: pushes.append(1) or real(**kw))

        def update(samples):
            scores, _ = steps.score_round(w, samples)
            adv, w.adv_state, _ = steps.advantage_round(w, scores)
            steps.update_round(w, samples, adv)

        update(_round(w, 0))
        assert pushes == [] and w.sampler_behind  # the update itself pushes nothing
        steps.evaluate_round(w, 1)  # the policy's held-out completions: from the updated weights
        assert pushes == [1] and not w.sampler_behind
        trained = {k: v.detach() for k, v in w.trainer.state_dict_for_sampler().items()}
        held = w.sampler.model.state_dict()
        assert all(torch.equal(held[k], v.to(held[k].dtype)) for k, v in trained.items())
        from stages.loop.resume import round_prompts

        samples, stats = steps.sample_round(w, 1, round_prompts(w.train_prompts, 1, w.params.train.prompts_per_round,
                                                                w.params.base.seed))
        assert pushes == [1] and stats["time/weight_sync_s"] == 0.0  # the engine had them already
        update(samples)
        samples, stats = steps.sample_round(w, 2, round_prompts(w.train_prompts, 2, w.params.train.prompts_per_round,
                                                                w.params.base.seed))
        assert pushes == [1, 1] and stats["time/weight_sync_s"] > 0.0  # the next round's sampling pushed, and timed it
        update(samples)
        assert pushes == [1, 1] and w.sampler_behind  # the run's last update: nothing generates after it
    finally:
        w.sampler.close()


def test_a_sampling_retried_after_its_push_reports_the_push(project, monkeypatch, tmp_path):
    """The flow retries a round's sampling once (`flows.train.sample_task`). Where the first try pushed the update's
    weights and then failed (sampling, or writing its samples), the retry finds the engine up to date: it reports the
    first try's push, not 0, and pushes nothing again; the round after reports its own push only."""
    import stages.loop.writer
    from flows.train import sample_task
    from stages.loop import steps
    from stages.loop.resume import round_prompts

    w = _warm(project())
    try:
        prompts = round_prompts(w.train_prompts, 1, w.params.train.prompts_per_round, w.params.base.seed)
        pushes, real_push, real_generate = [], w.sampler.update_weights, w.sampler.generate
        real_write = stages.loop.writer.write_artifact
        monkeypatch.setattr(w.sampler, "update_weights", lambda **kw: pushes.append(1) or real_push(**kw))

        def update(samples):
            scores, _ = steps.score_round(w, samples)
            adv, w.adv_state, _ = steps.advantage_round(w, scores)
            steps.update_round(w, samples, adv)

        def broken_generate(*args, **kwargs):
            monkeypatch.setattr(w.sampler, "generate", real_generate)  # fails once
            raise RuntimeError("transient")

        def full_disk(*args, **kwargs):
            monkeypatch.setattr(stages.loop.writer, "write_artifact", real_write)  # fails once
            raise OSError("No space left on device")

        update(_round(w, 0))
        for r, (obj, name, broken, error) in enumerate([(w.sampler, "generate", broken_generate, RuntimeError),
                                                        (stages.loop.writer, "write_artifact", full_disk, OSError)]):
            d = tmp_path / f"round={r:04d}"
            monkeypatch.setattr(obj, name, broken)
            with pytest.raises(error):
                sample_task.fn(w, 1, prompts, d)
            assert pushes == [1] * (r + 1) and not w.sampler_behind and w.unreported_push_s > 0, name
            pushed_s = w.unreported_push_s
            samples, stats, record = sample_task.fn(w, 1, prompts, d)  # the retry
            assert pushes == [1] * (r + 1) and stats["time/weight_sync_s"] == pushed_s and record is not None, name
            assert w.unreported_push_s == 0.0
            _, stats, _ = sample_task.fn(w, 2, prompts, d)  # nothing new to push, nothing left to report
            assert pushes == [1] * (r + 1) and stats["time/weight_sync_s"] == 0.0, name
            update(samples)
    finally:
        w.sampler.close()


def test_a_round_thinned_by_on_invalid_drop_trains_or_stops_naming_the_drop(project, monkeypatch, tmp_path):
    """`score.on_invalid: drop` with k = 2: a reward that is NaN for every second completion leaves each prompt one,
    and the round's advantages are 0 (as a partly thinned round's singletons), not the stage's "k < 2" refusal; a
    reward NaN for all stops at the score step, naming the drop (not "no rows; run the score stage first")."""
    from stages.errors import PipelineError
    from stages.loop import steps
    from stages.params import RewardSpec
    from stages.rewards import build_rewards

    (tmp_path / "thinning_rewards.py").write_text(
        "def half_nan(completions, **kw):\n"
        "    return [float('nan') if i % 2 else 1.0 for i, _ in enumerate(completions)]\n"
        "def all_nan(completions, **kw):\n"
        "    return [float('nan')] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    params = project(**{"sample.k": 2, "score.on_invalid": "drop"})
    score = params.score.model_copy(update={"rewards": [RewardSpec(name="h", function="thinning_rewards:half_nan")]})
    w = _warm(params.model_copy(update={"score": score}))
    try:
        samples = _round(w, 0)
        scores, stats = steps.score_round(w, samples)
        prompts = samples["prompt_id"].n_unique()
        assert stats["score/dropped"] == prompts and scores["prompt_id"].n_unique() == scores.height == prompts
        adv, _, a_stats = steps.advantage_round(w, scores)
        assert adv["advantage"].to_list() == [0.0] * prompts and a_stats["singleton_groups"] == prompts
        steps.update_round(w, samples, adv)
        w.rewards = build_rewards([RewardSpec(name="h", function="thinning_rewards:all_nan")])
        with pytest.raises(PipelineError, match=rf"^score.on_invalid: drop dropped all {samples.height} completions "
                                                r"\(each had a NaN or inf reward\); nothing is left to train on"):
            steps.score_round(w, _round(w, 1))
    finally:
        w.sampler.close()


def test_a_bf16_reference_pass_runs_on_the_references_bf16_view_with_its_numbers(project, monkeypatch):
    """`score.dtype: bfloat16` on a CPU (any CPU): the rounds' reference pass runs on the reference's bf16 view
    (`Warm.ref_bf16`) and gives the reference's own bf16 logprobs to the bit; under float32 params the same warm run's
    pass is the reference itself (the view's bf16 weights would not do for an fp32 pass)."""
    import stages.score
    from stages.loop import steps
    from stages.logprobs import sequence_logprobs
    from stages.score import completion_inputs

    w = _warm(project(**{"score.dtype": "bfloat16", "sample.dtype": "float32"}))
    try:
        assert w.ref_bf16 is not None and w.sampler.exact_logprobs  # (the policy's logprobs: the sampler's)
        samples = _round(w, 0)
        scores, _ = steps.score_round(w, samples)
        adv, w.adv_state, _ = steps.advantage_round(w, scores)
        steps.update_round(w, samples, adv)
        samples = _round(w, 1)
        used, real = [], stages.score.sequence_logprobs
        monkeypatch.setattr(stages.score, "sequence_logprobs", lambda model, *a, **k: used.append(model) or
                            real(model, *a, **k))
        scores, _ = steps.score_round(w, samples)
        assert len(used) == 1 and used[0] is w.ref_bf16
        p, c = completion_inputs(samples, w.tokenizer)
        own, _ = sequence_logprobs(w.ref, p, c, w.tokenizer.pad_token_id, w.params.score.batch_size, dtype="bfloat16")
        assert scores["logp_ref"].to_list() == own
        w.params = w.params.model_copy(update={"score": w.params.score.model_copy(update={"dtype": "float32"})})
        assert steps.scoring_reference(w) is w.ref
    finally:
        w.sampler.close()
