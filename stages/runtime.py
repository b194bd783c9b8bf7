"""Process-level set-up shared by the stages: device, threads, seeds, environment for vLLM and Prefect."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def configure_env(threads: int = 0) -> None:
    """Environment defaults that must be set before torch/vLLM/Prefect are imported (user values win)."""
    n = str(threads or os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", n)
    # vLLM in-process: 3.5 s start-up instead of a worker process; weights can be pushed directly.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines are pages of engine config
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # the temporary API server of a plain `python -m flows.train` can take >20 s to start on a busy 2-core box
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def setup_torch(device: str = "auto", threads: int = 0, seed: int | None = None):
    """Resolve `auto` to cuda/cpu, set torch threads and seeds; returns the torch.device."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        random.seed(seed)
        torch.manual_seed(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        from stages.errors import PipelineError

        raise PipelineError("base.device: cuda requested but torch sees no GPU; set base.device to auto or cpu")
    return torch.device(device)


def replace_dir(src: Path, dest: Path) -> None:
    """Move a fully written directory `src` into place at `dest`, replacing any old one."""
    dest = Path(dest)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / "d")
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(dest: Path) -> Path:
    """A fresh temporary directory beside `dest` (same filesystem, so `replace_dir` is a rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    return tmp


def fast_bf16() -> bool:
    """True where bf16 matmuls are native: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX.

    Without them (e.g. an AVX2-only CPU) torch emulates bf16 and it runs several times slower than fp32.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_dtype(dtype: str) -> str:
    """`auto` -> bfloat16 where it is native (see `fast_bf16`), else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16() else "float32"


def sampler_dtype(dtype: str) -> str:
    """`sample.dtype: auto` -> bfloat16 on GPUs, float32 on CPUs: an fp32 engine's logprobs are the policy's own, so
    the policy's scoring pass is skipped, which costs less than the bf16 engine's speed gains on CPUs (AVX512-BF16:
    fp32 sampling 4.5 s + no pass vs bf16 sampling 2.8 s + a 2.8 s fp32 pass per round, measured; AVX2: bf16 is
    emulated, fp32 is faster anyway; docs/design.md §7)."""
    import torch

    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
