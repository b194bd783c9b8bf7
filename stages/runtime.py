"""Process-level set-up shared by the stages: device, threads, seeds, environment for vLLM and Prefect."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MALLOC_ENV = "RLOO_MALLOC"  # auto (tcmalloc where installed) | system | a path to a malloc library
_MALLOC_DONE = "_RLOO_MALLOC_EXEC"  # set in the re-executed process: never re-exec twice
TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
            "/opt/homebrew/lib")


def find_malloc(setting: str | None = None, dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
    """The malloc library the training processes preload (`RLOO_MALLOC`): `auto` -> tcmalloc when installed (e.g.
    Debian's libtcmalloc-minimal4; `make setup` installs it where it can), `system` -> None (glibc's malloc), or
    the path given. A path that is not a file is an error."""
    setting = setting if setting is not None else os.environ.get(MALLOC_ENV, "auto")
    if setting == "system":
        return None
    if setting != "auto":
        if not Path(setting).is_file():
            from stages.errors import PipelineError

            raise PipelineError(f"{MALLOC_ENV}: {setting} is not a file; set it to the path of a malloc library "
                                "(e.g. libtcmalloc_minimal.so.4), to auto, or to system")
        return str(Path(setting).resolve())
    for d in (*dirs, str(Path(sys.prefix) / "lib")):
        for name in TCMALLOC:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return None


def malloc_env() -> dict | None:
    """This environment with the malloc library of `find_malloc` added to LD_PRELOAD (for a child process or a
    re-exec); None when there is nothing to add: no library found, off Linux, or already preloaded."""
    if sys.platform != "linux":
        return None
    lib = find_malloc()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload.replace(" ", ":").split(":"):
        return None
    return {**os.environ, "LD_PRELOAD": ":".join(x for x in (lib, preload) if x)}


def preload_malloc() -> None:
    """Re-execute this command with tcmalloc preloaded, once, before torch is imported (`RLOO_MALLOC`).

    glibc's malloc hands the update's large, short-lived buffers (logits, gradients, AdamW's temporaries: tens to
    hundreds of MB each) back to the kernel and gets them again zero-filled at every step; tcmalloc keeps them.
    Measured on the default task (2-core AMD EPYC, AVX512-BF16): 5.3M -> 1.8M page faults, kernel time 17 -> 9 s
    per 4 rounds, a round 8.6 -> 6.9 s (the update 3.5-4.3 -> 2.4-2.6 s), peak RSS 7.5 -> 7.3 GiB
    (docs/design.md §7). vLLM's CPU backend asks for the same (its "libtcmalloc is not found in LD_PRELOAD").
    Called first thing by the training, evaluation and serving commands; a no-op where `malloc_env` has nothing to
    add and in the re-executed process itself."""
    env = None if os.environ.get(_MALLOC_DONE) else malloc_env()
    if env is None:
        return
    env[_MALLOC_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def malloc_in_use() -> str:
    """The malloc library mapped into this process (its file name), or `glibc`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        for line in maps.splitlines():
            if name in line:
                return Path(line.split()[-1]).name
    return "glibc"


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


def launched_by_torchrun() -> bool:
    """This process is one rank of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def share_note() -> str:
    """Where several ranks each count their own share of a round (a warning's "n of m"): which rank's count it is;
    "" in one process. The round's totals are in its metrics (gathered)."""
    if not launched_by_torchrun():
        return ""
    return f" (rank {os.environ.get('RANK', '?')}'s share; the round's totals are in its metrics)"


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
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or amx_bf16())


def update_autocast(bf16_autocast: bool) -> bool:
    """`update.bf16_autocast` as it applies here: bf16 autocast in the update's forward/backward where bf16 is native
    (fp32 master weights), fp32 elsewhere (emulated bf16 is slower than fp32). The trainer and every benchmark that
    runs TRL in ours' precision decide it here."""
    return bool(bf16_autocast) and fast_bf16()


def score_dtype(dtype: str) -> str:
    """`score.dtype: auto` -> bfloat16 (autocast) where bf16 is native, float32 elsewhere. On the default task's trained
    policy the reference pass in bf16 puts 0.17 nats of |error| into a sequence's KL (mean; the policy's logprobs from
    the fp32 sampler), moves the batch's mean KL by 2-3 % and costs 0.76 instead of 2.16 s a round (2-core AVX512-BF16
    CPU); TRL scores both passes in bf16 autocast (0.26 nats). `make bench-precision`, docs/design.md §7."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16() else "float32"


def amx_bf16() -> bool:
    """True on CPUs with AMX bf16 tiles (Intel Sapphire Rapids and later), where torch's and oneDNN's bf16 matmuls run
    ~7x their fp32 (2.1-2.3 TFLOP/s against ~300 GFLOP/s on 2 cores, measured); AVX512-BF16 alone gives ~2x."""
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def micro_batch_size(setting: int | str, bf16_autocast: bool = True) -> int:
    """`update.micro_batch_size: auto` -> 32 on CPUs with AMX where the update runs in bf16 autocast, 16 elsewhere
    (0 = no cap). On AMX the bf16 matmuls are a third of the update and larger GEMMs run them faster: the default
    round (32 completions) in one forward/backward took 8-14 % off the update for +0.12-0.24 GiB of peak RSS (2-core
    Xeon, `benchmarks/first_update.py -S update.micro_batch_size=32`); elsewhere 16 keeps the peak RSS under TRL's
    (docs/design.md §7)."""
    import torch

    if setting != "auto":
        return int(setting)
    return 32 if bf16_autocast and not torch.cuda.is_available() and amx_bf16() else 16


def backend_dtype(dtype: str) -> str:
    """A sampler backend's dtype, which `make_sampler` resolved from `sample.dtype` (`sampler_dtype`, with the score
    params in view) before building it: an unresolved `auto` here is a bug in the caller, not a setting."""
    if dtype == "auto":
        raise ValueError("sample.dtype `auto` reached a sampler backend unresolved: build samplers with "
                         "stages.sample.make_sampler, which resolves it with the score params")
    return dtype


def sampler_dtype(dtype: str, score=None) -> str:
    """`sample.dtype: auto` -> bfloat16 on GPUs and on CPUs with AMX, float32 on other CPUs; also float32 on AMX when
    `score` (the score params) asks for an fp32 KL (`score.dtype` resolving to float32: the fp32 engine's logprobs need
    no pass, a bf16 engine would need an fp32 one) or for the sampler's own logprobs (`score.policy_logprobs: sampler`:
    exact ones, as before AMX counted). An fp32 engine's logprobs are the policy's own, so the policy's scoring pass is
    skipped: on AVX512-BF16 without AMX that costs as much as the bf16 engine's speed gains (fp32 sampling 2.46 s + no
    pass vs bf16 sampling 1.58 s + a 0.80 s bf16 pass per round, measured) and gives exact policy logprobs (a smaller KL
    error); on AMX the bf16 engine samples a round in 2.2 instead of 4.7 s and the bf16 pass costs 0.9 s, so bf16 saves
    ~1.5 s a round (~2.5 s where the update's own forward gives the policy's logprobs instead of that pass,
    `score.policy_logprobs`) for a KL error of TRL's class (both passes bf16: 0.26 against 0.17 nats per sequence, a
    smaller mean-KL bias); AVX2: bf16 is emulated, fp32 is faster anyway. docs/design.md §7."""
    import torch

    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if score is not None and (score.policy_logprobs == "sampler" or score_dtype(score.dtype) == "float32"):
        return "float32"
    return "bfloat16" if amx_bf16() else "float32"
