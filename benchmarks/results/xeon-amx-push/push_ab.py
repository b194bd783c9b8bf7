"""The weight push, direct (`_direct_reload`) and through vLLM's reload_weights, alternated in one process after one
update of the default round; then the same seeded generation after each (push_ab.txt). Ad hoc: run from the
repository root after `dvc repro prepare`, `python <this file>` (tcmalloc preloaded)."""
import sys, time, statistics as S
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import torch
from stages.loop.resume import round_prompts
from stages.loop import steps
from stages.loop.warm import load_warm
from stages.params import load_params
from stages.runtime import configure_env
from stages.sample import GenerationConfig
params = load_params(str(ROOT / "params.yaml"))
configure_env(params.base.threads)
w = load_warm(params, 40)
prompts = round_prompts(w.train_prompts, 0, params.train.prompts_per_round, params.base.seed)
samples, _ = steps.sample_round(w, 0, prompts)
scores, _ = steps.score_round(w, samples); advs, w.adv_state, _ = steps.advantage_round(w, scores); steps.update_round(w, samples, advs)
sd = w.trainer.state_dict_for_sampler()
s = w.sampler
ids = [[1, 2, 3, 4, 5, 6, 7]] * 2 + [[9, 8, 7, 100, 200]]
cfg = GenerationConfig(k=2, max_tokens=12, logprobs=True)
def gen():
    out = s.generate(ids, cfg, [1, 2, 3])
    return [(c.token_ids, c.logprobs) for g in out for c in g]
t = {True: [], False: []}
outs = {}
for i in range(8):
    direct = i % 2 == 0
    s.direct = direct
    t0 = time.perf_counter(); s.update_weights(state_dict=sd); t[direct].append(time.perf_counter() - t0)
    assert s.direct == direct, "fell back"
    outs.setdefault(direct, gen())
print("same outputs:", outs[True] == outs[False])
for k in (False, True): print("direct" if k else "reload", [round(x, 3) for x in t[k]], "median", round(S.median(t[k]), 3))
s.close()
