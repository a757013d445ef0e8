"""Entry point of the benchmarks: `python bench/run.py --help` (the harness itself is bench/harness.py)."""

import sys

from harness import ALIASES, TASKS, TITLES, main  # noqa: F401  (the smoke test reads TASKS and TITLES from here)

if __name__ == "__main__":
    sys.exit(main())
