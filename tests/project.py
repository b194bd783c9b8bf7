"""A small, real copy of the project for end-to-end tests: its own git + DVC repo in a temp dir, the
repo's stages/flows/dvc.yaml/prefect.yaml, a tiny local model instead of SmolLM2, and a params.yaml
shrunk to seconds per round. Nothing is mocked: `dvc repro`, the Prefect flow, vLLM and MLflow run for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent

PROMPTS = [
    "write a short review of a film you liked",
    "tell me about the best movie you have seen",
    "what did you think of the music and the cast",
    "the movie was great and the acting was",
    "a dull film with a terrible plot but",
    "the story is slow but the ending is",
    "i loved every minute of it because",
    "this is a test prompt for the pipeline",
    "tell me about the acting",
    "write a review of the music",
    "what did you think of the ending",
    "the cast was wonderful and",
]


def tiny_params(model_dir: Path, root: Path, **overrides) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"].update(model=str(model_dir), model_dir="models/base", seed=7)
    params["prepare"].update(prompts="data/prompts/tiny.jsonl", eval_size=4, max_prompt_tokens=64)
    params["sample"].update(k=3, max_completion_length=6, max_model_len=128, temperature=1.0)
    params["score"].update(batch_size=8)
    params["score"]["rewards"] = [
        {"name": "sentiment", "function": "vader", "weight": 1.0},
        {"name": "length", "function": "length", "weight": 0.5, "kwargs": {"min_words": 4}},
    ]
    params["update"].update(learning_rate=1e-3, save_every=1)
    params["evaluate"].update(max_completion_length=6, num_examples=2)
    params["train"].update(rounds=2, prompts_per_round=3, eval_every=2)
    params["mlflow"].update(tracking_uri=f"sqlite:///{root}/mlflow.db", log_completions=4)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        params[section][key] = value
    return params


def run_env(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        PYTHONUNBUFFERED="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the project's sample.cpu_kvcache_space_gib sizes the cache
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_project(root: Path, model_dir: Path, **overrides) -> Path:
    """A git + DVC repo at root/project with the project's code and a tiny configuration."""
    proj = root / "project"
    proj.mkdir(parents=True)
    for name in ("stages", "flows"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "prefect.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(REPO / name, proj / name)
    (proj / "data" / "prompts").mkdir(parents=True)
    (proj / "data" / "prompts" / "tiny.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir, root, **overrides), sort_keys=False))
    env = run_env(root)
    run(["git", "init", "-q"], proj, env)
    run([str(BIN / "dvc"), "init", "-q"], proj, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], proj, env)
    run(["git", "add", "-A"], proj, env)
    run(["git", "commit", "-qm", "tiny project"], proj, env)
    return proj
