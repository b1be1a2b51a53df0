"""Run the bad-input corpus and the interruption tests; print cases per class, passed and
failed, and regenerate docs/results/robustness.md.

    python benchmarks/robustness.py          # everything in tests/badinput (slow tests too)

Every table in tests/badinput/ counts: `CASES` of test_corpus.py and of any cases_*.py
module. A case is matched to its pytest result by its id.
"""

from __future__ import annotations

import collections
import importlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, write_json, write_section  # noqa: E402

CLASSES = {
    "security": "a file naming code to run (pickles, torch.save, factories in metadata, "
                "YAML python tags); the payload's marker file must never appear",
    "checkpoint": "truncated, corrupt, foreign, NaN/Inf, wrong shapes or widths",
    "data": "bad IDX / CIFAR / image-folder data and data specs",
    "bomb": "memory and CPU bombs: headers claiming 2^28 images, pickles sharing one row "
            "300,000 times, 10,001 class folders, ?size=4096, YAML billion laughs, "
            "--epochs inf, --steps 1e6, --augment 1e6, --seed 2^64",
    "cli-range": "every CLI number out of its documented range",
    "cli-choice": "unknown names: criteria, models, scopes, clip modes, formats, options",
    "cli-combination": "options that exclude or need each other",
    "config": "configs with wrong keys, types, values, files",
    "output": "outputs that are FIFOs, sockets, /dev/null, links to them, folders, files "
              "where a folder must be",
    "environment": "RANK / WORLD_SIZE / LOCAL_RANK / XAICOMPRESS_MAX_DATA_GB that make no "
                   "sense",
    "fault": "a full disk (ENOSPC) while writing",
}


def tables() -> list:
    sys.path.insert(0, str(ROOT))
    cases = list(importlib.import_module("tests.badinput.test_corpus").CASES)
    for path in sorted((ROOT / "tests" / "badinput").glob("cases_*.py")):
        cases += list(importlib.import_module(f"tests.badinput.{path.stem}").CASES)
    return cases


def run_pytest() -> tuple[dict[str, str], dict[str, str], float, str]:
    """(case id -> outcome, other test name -> outcome, seconds, pytest's last line)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", "tests/badinput"], cwd=ROOT,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        cases: dict[str, str] = {}
        others: dict[str, str] = {}
        for tc in ET.parse(xml).getroot().iter("testcase"):
            name = tc.get("name", "")
            failed = any(tc.find(t) is not None for t in ("failure", "error"))
            outcome = "failed" if failed else ("skipped" if tc.find("skipped") is not None
                                               else "passed")
            if "[" in name and name.startswith("test_bad"):
                cases[name[name.index("[") + 1:-1]] = outcome
            else:
                others[name] = outcome
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return cases, others, seconds, tail


def main() -> None:
    cases = tables()
    results, others, seconds, tail = run_pytest()
    per_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for c in cases:
        per_class[c.kind][results.get(c.id, "not run")] += 1
    total = collections.Counter(results.get(c.id, "not run") for c in cases)
    commands = sorted({c.args[0] for c in cases})
    print(f"{'class':<16} {'cases':>5} {'passed':>6} {'failed':>6}")
    for kind in sorted(per_class):
        n, passed = sum(per_class[kind].values()), per_class[kind]["passed"]
        print(f"{kind:<16} {n:>5} {passed:>6} {n - passed:>6}")
    print(f"{'all':<16} {len(cases):>5} {total['passed']:>6} {len(cases) - total['passed']:>6}")
    print(f"other tests: {sum(v == 'passed' for v in others.values())}/{len(others)} passed "
          f"({', '.join(sorted(others))}); {seconds:.0f} s")
    ok = total["passed"] == len(cases) and all(v == "passed" for v in others.values())
    write_json("robustness", {"cases": len(cases), "commands": commands, "passed":
                              total["passed"], "per_class": {k: dict(v) for k, v in
                                                             per_class.items()},
                              "other_tests": others, "pytest": tail, "seconds": seconds})
    rows = [f"| {k} | {sum(per_class[k].values())} | {per_class[k]['passed']} | "
            f"{CLASSES.get(k, '')} |" for k in sorted(per_class)]
    md = ["## Robustness (bad-input corpus)", "",
          f"`tests/badinput/`: **{len(cases)} bad inputs** run through the real CLI across "
          f"{len(commands)} commands ({', '.join(commands)}). Each must exit with code 2, "
          "print one line naming the input, no traceback, stay below 1 GiB of extra memory "
          "(RLIMIT_AS), create, change or delete no file (contents and modes), and never run "
          "a payload (`tests/badinput/harness.py`).", "",
          "| class | cases | passed | what |", "|---|---:|---:|---|", *rows,
          f"| **all** | **{len(cases)}** | **{total['passed']}** | |", "",
          "Besides the table: SIGKILL at random moments (every file left loads, a rerun "
          "finishes), SIGINT and SIGTERM mid-run (exit 130 / 143, one line saying what was "
          "kept, no half-written file, the rerun resumes from the cache) and a held signal "
          f"while outputs are written: {sum(v == 'passed' for v in others.values())} of "
          f"{len(others)} pass.", "",
          f"Last run (`python benchmarks/robustness.py`): {tail} — "
          f"**{'all pass' if ok else 'FAILURES'}**, {seconds:.0f} s."]
    write_section("robustness", "\n".join(md))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
