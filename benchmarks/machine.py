"""One line that says which machine a benchmark ran on (the README's tables carry it)."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """E.g. `2 CPU cores (AMD EPYC, AVX512-BF16, no AMX: bf16 native), no GPU, torch 2.13.0+cpu, bf16 autocast on,
    malloc libtcmalloc_minimal.so.4` (the malloc the benchmark's workers get: `stages.runtime.find_malloc`)."""
    import torch

    from stages.runtime import fast_bf16, find_malloc

    if torch.cuda.is_available():
        hw = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        model, flags = platform.processor() or platform.machine(), set()
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read().splitlines()
            model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), model)
            flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
        except OSError:
            pass
        isa = f"{'AVX512-BF16' if 'avx512_bf16' in flags else 'no AVX512-BF16'}, {'AMX' if 'amx_bf16' in flags else 'no AMX'}"
        hw = f"{os.cpu_count()} CPU cores ({model}, {isa}: bf16 {'native' if fast_bf16() else 'emulated'}), no GPU"
    malloc = find_malloc()
    return (f"{hw}, torch {torch.__version__}, bf16 autocast {'on' if fast_bf16() else 'off (emulated)'}, "
            f"malloc {os.path.basename(malloc) if malloc else 'glibc'}")


def code_version() -> str | None:
    """The code a benchmark measured: this checkout's commit (7 hex digits), with `-dirty` where tracked files have
    uncommitted changes; None outside a git checkout. Tables carry it (`stamp`): a figure names the commit it
    measured, so a later change can be compared against it."""
    import subprocess
    from pathlib import Path

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=7", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def stamp(meta: dict) -> str:
    """A table's first words: its date, machine and, where recorded (since 2026-12-07), the code it measured."""
    return f"{meta['date']}, {meta['machine']}" + (f", code {meta['code']}" if meta.get("code") else "")


def params_name(path: str) -> str:
    """How a benchmark's table names its parameters: `default params.yaml`, or the file the run was given (a table
    from `--params other.yaml` must not claim the defaults)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return "default params.yaml" if Path(path).resolve() == (root / "params.yaml").resolve() else f"params {path}"


def require_prepared(root, eval_split: bool = False) -> None:
    """Stop in one line when the base model or the prepared split a benchmark reads is missing (with `eval_split`,
    the held-out one too): `dvc repro prepare` writes them."""
    from pathlib import Path

    from stages.errors import PipelineError

    needs = ["models/base/config.json", "data/prepared/train.parquet"]
    for need in needs + (["data/prepared/eval.parquet"] if eval_split else []):
        if not (Path(root) / need).exists():
            raise PipelineError(f"{need} is missing; run `dvc repro prepare` first")


def flow_workdir(root, work) -> None:
    """Run a benchmark's flow from `work`, not the repo: the flow writes metrics/train.json and plots/train.csv
    relative to the working directory, and those of the repo's own `dvc repro` must stay as they are.
    `models/` and `data/` are linked from the repo (params.yaml names them relative); the MLflow store comes
    from the overrides, never from a MLFLOW_TRACKING_URI of the caller's shell."""
    import os
    from pathlib import Path

    root, work = Path(root), Path(work)
    for name in ("models", "data"):
        if not (work / name).exists():
            (work / name).symlink_to(root / name, target_is_directory=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(work)


def alternate_arms(tmp, arms: list[str], repeats: int, script: str, args: list[str], unit: str,
                   glibc_arms: tuple[str, ...] = (), repeat_args=None):
    """Run each arm's worker (`script --worker ARM --work DIR ARGS`) in its own process, the arms in turn,
    `repeats` times; yields (repeat, arm, work dir, exit code). Every worker gets the malloc the training command
    preloads (`stages.runtime.malloc_env`), except `glibc_arms`, which get glibc's. `repeat_args(repeat)`: more
    arguments for every arm of that repeat (e.g. its seed)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from stages.runtime import MALLOC_ENV, malloc_env

    root = Path(script).resolve().parents[1]
    glibc = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, MALLOC_ENV: "system"}
    for rep in range(repeats):
        for arm in arms:
            work = Path(tmp) / f"{arm}-{rep}"
            work.mkdir()
            print(f"[{time.strftime('%H:%M:%S')}] repeat {rep + 1}/{repeats}: {arm}: {unit} ...", flush=True)
            cmd = [sys.executable, script, "--worker", arm, "--work", str(work), *args,
                   *(repeat_args(rep) if repeat_args else [])]
            # every arm with the malloc the training command preloads (tcmalloc where installed): like for like
            env = glibc if arm in glibc_arms else malloc_env()
            yield rep, arm, work, subprocess.run(cmd, cwd=root, env=env).returncode


def paired_setup(doc: str, name: str, rounds: int, argv: list[str] | None, options: dict | None = None):
    """The start of an in-process paired benchmark (vllm_norms.py, attention.py): the malloc the training command
    runs with (re-executing the script under it when started from the shell), its command line (`--params`,
    `--rounds`: timed pairs after one warm-up pair, `--out`, default benchmarks/results/NAME, and `options`, a dict
    of flag -> argparse kwargs, whose values NAME may use: "vllm_{change}"), the prepared inputs, and the warm run for
    `rounds + 1` rounds. Returns (args, params, warm)."""
    import argparse
    from pathlib import Path

    from stages.runtime import preload_malloc

    if argv is None:  # with the malloc the training command runs with (tcmalloc where installed)
        preload_malloc()
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=rounds, help="timed pairs of rounds (after one warm-up pair)")
    ap.add_argument("--out", help=f"default benchmarks/results/{name}")
    for flag, kwargs in (options or {}).items():
        ap.add_argument(flag, **kwargs)
    args = ap.parse_args(argv)
    args.out = args.out or str(root / "benchmarks" / "results" / name.format(**vars(args)))
    require_prepared(root)
    from stages.loop.warm import load_warm
    from stages.params import load_params
    from stages.runtime import configure_env

    params = load_params(args.params)
    configure_env(params.base.threads)
    return args, params, load_warm(params, args.rounds + 1)
