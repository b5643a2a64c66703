"""Latency scaling sweep: ``python -m benchmarks.scaling [options]`` (same as ``imrnns bench``).

A thin wrapper: the sweep lives in :mod:`imrnns.bench` so that the installed ``imrnns bench``
command has it too. Results go to ``benchmarks/results/<machine>.{json,md,png}``; the JSON
validates against ``benchmarks/schema/scaling.schema.json``. ``--help`` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imrnns.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=str(ROOT / "benchmarks" / "results")))
