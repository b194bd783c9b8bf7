"""dvc.yaml lists, for every stage, every project source file its command imports (docs/design.md §2): otherwise
editing a shared module leaves `dvc repro` calling stale results "up to date". The import closure is computed from
the code (every `import` anywhere in a module, function bodies included, plus the sampler backends that the
backends table imports by name), so a new import fails this test until dvc.yaml names the file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "flows")


def module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*parts, mod] if mod else parts)
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}  # `from stages import checkpoint`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"((?:stages|flows)(?:\.\w+)+):\w+", node.value)  # "module:Class" targets
            if m:
                names.add(m.group(1))
    return {n for n in names if n.split(".")[0] in PACKAGES}


def closure(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            f = module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(imports_of(f))
    return seen


def stage_module(cmd: str) -> str:
    m = re.search(r"python -m ([\w.]+)", cmd)
    assert m, f"stage command {cmd!r} is not `python -m <module>`"
    return m.group(1)


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency(stage):
    spec = STAGES[stage]
    deps = [d for d in spec.get("deps", []) if not d.startswith("$")]
    files = closure(stage_module(spec["cmd"]))
    missing = sorted(str(f.relative_to(REPO)) for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml stage `{stage}` imports {missing} but does not list them in deps"


def test_the_closure_follows_lazy_and_table_imports():
    """The checker itself: function-level imports and the backends table's targets are found."""
    train = {str(f.relative_to(REPO)) for f in closure("flows.train")}
    assert {"stages/io.py", "stages/params.py", "stages/checkpoint.py", "stages/sample/vllm_backend.py",
            "stages/sample/hf_backend.py", "stages/estimators.py"} <= train
    assert "stages/report.py" not in train
