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
import re
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


# Why a mutant that survives is harmless, by what it changes: (function name part, test on the changed lines, reason).
# The first rule that matches names the reason in the report; a survivor no rule explains is marked for review.
def _only_progress(minus: str, plus: str) -> bool:
    strip = lambda s: re.sub(r',? ?progress=[^,)]*', '', s).replace(", )", ")").strip(" ,")  # a removed line too
    return "progress=" in minus and strip(minus) == strip(plus)


def _dropped_arg(*names: str):
    """The mutant removed one of `names` from a call (the callee's default then applies)."""
    return lambda m, p: any(re.sub(rf"\b{n}, ", "", m, count=1) == p for n in names)


RULES = [
    ("", _only_progress, "a progress-bar label: display only"),
    ("", _dropped_arg("pad"), "the pad id moved into the batch-size slot: padded positions are masked, the batch "
                              "size only groups rows"),
    ("", _dropped_arg("batch_size", "bs"), "the batch size falls back to its default: it only groups rows, the "
                                           "logprobs are the same"),
    ("evaluate_policy", lambda m, p: "batch_size: int = 16" in m, "the default batch size: it only groups rows"),
    ("", lambda m, p: "astype(None)" in p or re.search(r"np\.asarray\([a-z_]+, (dtype=None)?\)", p) is not None,
     "float64 either way (numpy's default dtype; the lists hold Python floats)"),
    ("", lambda m, p: 'float("NAN")' in p, 'float("NAN") is nan too'),
    ("", lambda m, p: "maintain_order" in m and ("maintain_order=None" in p or "maintain_order" not in p),
     "not observable in a small test: polars keeps the left frame's order at these sizes without the flag; "
     "`maintain_order=\"left\"` guarantees it at any size"),
    ("completion_inputs", lambda m, p: "add_special_tokens" in m,
     "the tokenizers here (SmolLM2's, the tests' tiny one) add no special tokens, so the flag changes nothing for "
     "them; it matters for a tokenizer that adds a BOS"),
    ("score_samples", lambda m, p: "share" in m,
     "shared-prompt and per-row logprobs agree within 1e-3 nats (a speed choice; tests/test_precision.py pins "
     "the shared path against a plain fp32 pass)"),
    ("score_samples", lambda m, p: "is_masked(v)) or True" in p or "is_masked(v)) and False" in p,
     "a NaN left as NaN or made null is on a row that on_invalid drops or refuses"),
    ("score_stats", lambda m, p: "if (n) or True" in p or "np.array(None)" in p,
     "the empty table: the mean of no rows is nan either way, and `score` is not read then"),
    ("kl_and_reward", lambda m, p: "kl_level: str" in m, "only `token` is special: any other default is the "
                                                         "sequence-level KL"),
    ("_grpo", lambda m, p: True, "the one-completion group takes the `otherwise` branch (advantage 0) either way"),
    ("plan_resume", lambda m, p: "r >= n" in p, "after the loop n is not a key, so r >= n and r > n agree"),
    ("plan_resume", lambda m, p: "ckpt_run = None" in m,
     "read only where the checkpoint is there (ids then has two members and the rounds have one), which sets it"),
    ("_trl_named", lambda m, p: '(pl.col("n") > 1)' in m and '(pl.col("n") >= 1)' in p,
     "a one-completion prompt's std is null, and the mean skips nulls"),
    ("_trl_named", lambda m, p: "<= 1e-8" in m and "< 1e-8" in p,
     "TRL's isclose(std, 0) tolerance: a prompt's reward std of exactly 1e-8 does not occur"),
    ("reward_inputs", lambda m, p: 'how="left"' in m and 'how="left"' not in p,
     "every sample's prompt is in the table (one missing is refused before the join): a left and an inner join give "
     "the same rows"),
    ("", lambda m, p: "min_batches=policy_batches" in m or "policy_batches: int = 0" in m,
     "the least batches of a sharded (FSDP) policy pass: a one-process pass runs one batch or more whatever the least "
     "(the sharded pass is tested in tests/test_distributed.py, outside the mutation selection)"),
    ("evaluate_policy", lambda m, p: "prompt_cache=ref_prompt_cache" in m,
     "the reference's shared-prompt cache: shared-prompt and per-row logprobs agree within 1e-3 nats (a speed "
     "choice; tests/test_precision.py pins the shared path against a plain fp32 pass)"),
    ("compute_advantages", lambda m, p: ".row(None, named=True)" in p or ".row(named=True)" in p,
     "the statistics frame has one row: row(None) and row() read it"),
    ("compute_advantages", lambda m, p: "- WHITEN_EPS" in p,
     "1e-8 against the advantages' std: no visible change; zero spread gives +0 or -0"),
    ("", lambda m, p: "is_duplicated" in p and (".row(1)" in p or '["prompt_id"][1]' in p),
     "both rows of a duplicated key hold that key"),
    ("policy_loss", lambda m, p: ".sum(+1)" in p or ".unsqueeze(+1)" in p,
     "on (B, T) and (B,) tensors axis +1 is axis -1"),
    ("paired_bootstrap", lambda m, p: "integers(n," in p, "integers(n) draws the same stream as integers(0, n)"),
    ("distinct_n", lambda m, p: ".upper()" in p, "upper- and lower-case folding count the same distinct words "
                                                 "(they differ only for a few non-ASCII letters)"),
    ("eval_metrics", lambda m, p: 'fill_null("XXXX")' in p, "a one-word filler has no bigram, as the empty string"),
    ("file_record", lambda m, p: "fh.read(" in p, "the hash's read block size: the same digest"),
    ("archive_run", lambda m, p: "exist_ok" in m, "`exist_ok=False` is the default and None is falsy"),
    ("loo_baseline", lambda m, p: True, "the RLOO expression reads no carried state"),
    ("round_prompts", lambda m, p: True, "the replay loop: its history has exactly r entries there"),
    ("rloo_torch_grouped", lambda m, p: "device" in p or "device" in m or "minlength" in m or "+ 2" in p,
     "an extra empty group, bincount's minlength or the device of a CPU tensor: no row changes on CPU (the device "
     "matters on CUDA, where the CPU suite does not run)"),
    ("evaluate_policy", lambda m, p: "ref is policy" in m,
     "recomputing the reference's logprobs when the reference is the policy gives the same numbers"),
]


def reason(name: str, diff: str) -> str:
    minus = " ".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---"))
    plus = " ".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++"))
    for part, test, why in RULES:
        if part in name and test(minus, plus):
            return why
    return "no reason recorded: review it (an equivalent mutant, or a test to add)"


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
    diffs = {name: get_diff_for_mutant(name, path=module).strip() for module, name, _ in survivors}
    why = {name: reason(name, diffs[name]) for name in diffs}
    unexplained = [n for n, w in why.items() if w.startswith("no reason")]
    md += ["", f"## Not killed ({len(survivors)}; not checked: {total['not checked']}; without a recorded reason: "
               f"{len(unexplained)})", "",
           "Why each is harmless, by kind (the rules are in benchmarks/mutation_report.py):", ""]
    md += [f"- {w}: {n}" for w, n in Counter(why.values()).most_common()]
    md.append("")
    for module, name, status in survivors:
        md += [f"### `{name}` ({status})", "", f"Why harmless: {why[name]}.", "", "```diff", diffs[name], "```", ""]
    text = "\n".join(md) + "\n"
    from stages.io import write_text

    write_text(text, args.out)
    print("\n".join(md[: len(rows) + 5]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
