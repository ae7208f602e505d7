"""Side-by-side speed benchmarks: `python scripts/benchmark.py cache` (see benchmarks/speed.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from speed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
