"""The mutation score of `make mutate`, per module, and every mutant the tests did not kill, with its diff.

Reads what `mutmut run` left in `mutants/` (one `.meta` file per mutated module) and writes
benchmarks/results/mutation.md (and prints the per-module table). Score = (killed + timeout) / (all - skipped), as
mutmut's own badge counts it; "no tests" and "not checked" count against it.

    python benchmarks/mutation_report.py [--minutes 31.5]   # the run's wall time, to record it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

KILLED = {"killed", "timeout"}


def collect(mutants: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} from mutmut's meta files."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[str(meta.relative_to(mutants))[: -len(".meta")]] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", default=str(ROOT / "mutants"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation.md"))
    ap.add_argument("--minutes", type=float, help="wall time of the mutmut run, recorded in the table's caption")
    ap.add_argument("--note", default="", help="a sentence added to the caption (e.g. how the run was stopped)")
    args = ap.parse_args(argv)
    mutants = Path(args.mutants)
    if not mutants.is_dir():
        sys.exit(f"error: {mutants} does not exist: run `make mutate` first")
    os.chdir(mutants.parent)  # mutmut's helpers read ./mutants and the pyproject config
    from machine import describe
    from mutmut.configuration import config  # noqa: F401  (loads pyproject's [tool.mutmut])
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    by_module = collect(mutants)
    rows, survivors, total = [], [], Counter()
    for module, statuses in by_module.items():
        c = Counter(statuses.values())
        total.update(c)
        tested = len(statuses) - c["skipped"]
        rows.append((module, c, tested))
        survivors += [(module, name, st) for name, st in statuses.items() if st not in KILLED | {"skipped", "not checked"}]

    def line(name: str, c: Counter, tested: int) -> str:
        killed = c["killed"] + c["timeout"]
        score = 100 * killed / tested if tested else float("nan")
        return (f"| {name} | {killed} / {tested} | **{score:.1f} %** | {c['killed']} | {c['timeout']} | {c['survived']} | "
                f"{c['no tests']} | {c['not checked']} |")

    when = f"{time.strftime('%Y-%m-%d')}, {describe()}" + (f", {args.minutes:.0f} min" if args.minutes else "")
    md = [f"Mutation testing of the core modules (`make mutate`, mutmut, the fast tests of those modules; {when}). "
          f"{args.note}".strip(), "",
          "| module | killed / tested | score | killed | timeout | survived | no tests | not checked |",
          "|---|---|---|---|---|---|---|---|"]
    md += [line(m, c, t) for m, c, t in rows]
    md.append(line("**all**", total, sum(t for _, _, t in rows)))
    md += ["", f"## Not killed ({len(survivors)}; not checked: {total['not checked']})", ""]
    for module, name, status in survivors:
        diff = get_diff_for_mutant(name, path=module)
        md += [f"### `{name}` ({status})", "", "```diff", diff.strip(), "```", ""]
    text = "\n".join(md) + "\n"
    from stages.io import write_text

    write_text(text, args.out)
    print("\n".join(md[: len(rows) + 5]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
