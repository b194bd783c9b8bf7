"""In one process, the kept casts (fused SwiGLU) and the reference's bf16 view on and off, alternated round by round
(in_process.txt, run 2). Ad hoc: run from the repository root after `dvc repro prepare`, `N=16 python <this file>`."""
import os
import resource
import statistics as S
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from stages.loop.resume import round_prompts
from stages.loop import steps
from stages.loop.warm import load_warm
from stages.params import load_params
from stages.runtime import configure_env
params = load_params(str(ROOT / "params.yaml"))
configure_env(params.base.threads)
w = load_warm(params, 40)
view = w.ref_bf16
def set_on(on):
    for m in w.trainer.model.modules():
        if hasattr(m, "_keep_casts"): m._keep_casts = on
    w.ref_bf16 = view if on else None
res = {}
for r in range(2):
    prompts = round_prompts(w.train_prompts, r, params.train.prompts_per_round, params.base.seed)
    samples, _ = steps.sample_round(w, r, prompts); scores, _ = steps.score_round(w, samples)
    advs, w.adv_state, _ = steps.advantage_round(w, scores); steps.update_round(w, samples, advs)
N = int(os.environ.get("N", "16"))
for i in range(N):
    on = i % 2 == 0
    set_on(on)
    t0 = time.perf_counter(); scores, sc = steps.score_round(w, samples); t1 = time.perf_counter()
    advs, w.adv_state, _ = steps.advantage_round(w, scores)
    st = steps.update_round(w, samples, advs); t2 = time.perf_counter()
    sync = steps.sync_sampler(w)
    pf = sc["time/policy_forward_s"]
    d = res.setdefault(on, {"reference pass": [], "policy forward": [], "update": [], "push": []})
    d["reference pass"].append(t1 - t0 - pf); d["policy forward"].append(pf); d["update"].append(t2 - t1); d["push"].append(sync)
print(f"{N} rounds on the same samples after 2 warm rounds, arms alternated; median [min-max] seconds")
for on in (False, True):
    print("kept casts + reference view" if on else "code before (casts again)  ",
          {k: f"{S.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]" for k, v in res[on].items()})
print("peak RSS GiB (both arms in one process)", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
w.sampler.close()
