"""One round of the loop's steps, in one process or under torchrun, for tests/test_distributed.py.

    python tests/dist_round.py OUT PARAMS            # one process
    torchrun --nproc_per_node 2 tests/dist_round.py OUT PARAMS

Run from a directory with data/prepared/{train,eval}.parquet. Rank 0 writes OUT/samples.parquet, OUT/scores.parquet (and
OUT/ref_scores.parquet: the round scored again with its reference pass; OUT/policy_is_ref: round 1 skipped it),
OUT/adv_<estimator>[_norm].parquet (every estimator over the same scores) and OUT/weights.safetensors (the policy after
the update), so the test can hold the two runs equal; with DIST_ROUND_EVAL=1 also OUT/eval.json, the held-out
evaluation of the updated policy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import polars as pl


def main(out: str, params_path: str) -> None:
    from safetensors.torch import save_file

    from stages.estimators import ESTIMATORS
    from stages.loop import steps
    from stages.loop.dist import init_distributed
    from stages.loop.resume import round_prompts
    from stages.loop.warm import load_warm
    from stages.params import load_params
    from stages.runtime import configure_env

    params = load_params(params_path)
    configure_env(params.base.threads)
    dist, device = init_distributed("cpu", 120)
    evaluate = bool(os.environ.get("DIST_ROUND_EVAL"))
    w = load_warm(params, 2, dist=dist, device=device, with_eval=evaluate)
    prompts = round_prompts(w.train_prompts, 0, params.train.prompts_per_round, params.base.seed)
    samples, _ = steps.sample_round(w, 0, prompts)
    policy_was_ref = w.policy_is_ref  # the fresh trainer is the reference (FSDP: compared on gathered shards)
    scores, _ = steps.score_round(w, samples)  # so round 1 runs no reference pass
    w.policy_is_ref = False
    ref_scores, _ = steps.score_round(w, samples)  # the same round with the reference pass, held equal across ranks
    w.policy_is_ref = policy_was_ref
    out_dir = Path(out)
    advs = {}
    for est in ESTIMATORS:
        for norm in (False, True):
            ap = params.advantage.model_copy(update={"estimator": est, "normalize_advantages": norm})
            w.params = params.model_copy(update={"advantage": ap})
            advs[f"adv_{est}{'_norm' if norm else ''}"], _, _ = steps.advantage_round(w, scores)
    w.params = params
    stats = steps.update_round(w, samples, advs["adv_rloo"])
    metrics = steps.evaluate_round(w, 1) if evaluate else None  # the updated policy on the held-out prompts
    sd = w.trainer.full_state_dict()
    gathered = w.trainer.gathered_state()  # what the flow's checkpoint takes (FSDP: every rank takes part)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from stages import checkpoint

        checkpoint.save(w.trainer, out_dir / "policy", out_dir / "state", {"identity": "dist-round"}, gathered=gathered)
        samples.write_parquet(out_dir / "samples.parquet")
        scores.write_parquet(out_dir / "scores.parquet")
        ref_scores.write_parquet(out_dir / "ref_scores.parquet")
        (out_dir / "policy_is_ref").write_text(str(policy_was_ref))
        if metrics is not None:
            (out_dir / "eval.json").write_text(json.dumps(metrics, default=float))
        for name, df in advs.items():
            df.write_parquet(out_dir / f"{name}.parquet")
        seen, tensors = set(), {}
        for k, v in sd.items():
            if v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                tensors[k] = v.detach().contiguous().cpu()
        save_file(tensors, out_dir / "weights.safetensors")
        pl.DataFrame([{k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}]).write_parquet(
            out_dir / "update_stats.parquet")
    dist.barrier()
    w.sampler.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
