"""``python -m benchmarks.scaling [options]``: the latency scaling sweep (``--help``)."""

import sys

from benchmarks.scaling.cli import main

sys.exit(main())
