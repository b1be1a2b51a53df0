"""Run the bad-input corpus and the SIGKILL test; record how many cases there are and pass.

    python benchmarks/robustness.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, write_json, write_section  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/badinput"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    sys.path.insert(0, str(ROOT))
    from tests.badinput.test_corpus import CASES

    commands = sorted({c.args[0] for c in CASES})
    write_json("robustness", {"cases": len(CASES), "commands": commands, "passed": passed,
                              "failed": failed, "pytest": tail, "seconds": seconds})
    verdict = "all pass" if failed == 0 and proc.returncode == 0 else f"{failed} FAIL"
    md = ["## Robustness (bad-input corpus)", "",
          f"`tests/badinput/`: **{len(CASES)} bad inputs** run through the real CLI across "
          f"{len(commands)} commands ({', '.join(commands)}): truncated, corrupted, foreign "
          "and pickled checkpoints (the pickle's payload provably does not run), NaN/Inf "
          "weights, wrong metadata and shapes, bad IDX/CIFAR/image-folder data, configs with "
          "unknown keys, wrong types, out-of-range ratios, zero/negative bits and impossible "
          "budgets, unimportable models, data that does not fit the model, unwritable outputs. "
          "Each must exit with code 2, print one line naming the input, no traceback, and "
          "leave no file created or changed. Plus a test that SIGKILLs `compress` at random "
          "moments (every file left loads; a rerun finishes) and hypothesis property tests "
          "of the config and data-spec parsers (in `tests/test_config.py`, "
          "`tests/test_data_spec.py`).", "",
          f"Last run (`python benchmarks/robustness.py`): {tail} — **{verdict}**, "
          f"{seconds:.0f} s."]
    write_section("robustness", "\n".join(md))
    sys.exit(0 if verdict == "all pass" else 1)


if __name__ == "__main__":
    main()
