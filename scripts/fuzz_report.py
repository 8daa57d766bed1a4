"""Count the outcomes of loading N seeded mutants of tiny model files (see scripts/fuzz_mutate.py).

    python scripts/fuzz_report.py [-n 300] [--seed 0] [--tree PATH]

--tree picks the vlm checkout the mutants are loaded with (another worktree, to compare
before/after); the seeds are always built by this checkout. Prints a Markdown table of counts
by outcome, then one example of each bad outcome.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from fuzz_mutate import GOOD, make_mutants, make_seeds, run_mutants, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="mutants (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tree", type=Path, default=ROOT, help="vlm checkout to test (default: this one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = make_seeds(Path(tmp))
        (Path(tmp) / "mutants").mkdir()
        mutants = make_mutants(seeds, Path(tmp) / "mutants", args.n, args.seed)
        t = time.perf_counter()
        results = run_mutants(mutants, args.tree.resolve())
        seconds = time.perf_counter() - t
    print(f"tree {args.tree}: {args.n} mutants (seed {args.seed}) in {seconds:.0f} s\n")
    print(table(results))
    shown = set()
    for path, (outcome, detail) in zip(mutants, results, strict=True):
        if outcome not in GOOD and outcome not in shown:
            shown.add(outcome)
            print(f"\n{outcome}: {path.name}: {detail}")


if __name__ == "__main__":
    main()
