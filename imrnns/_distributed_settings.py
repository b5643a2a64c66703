"""Settings of sharded search that the command line needs without importing torch.

:mod:`imrnns.index.distributed` uses them; ``imrnns --help`` builds the distributed options
from them, so showing the help loads no torch.
"""

from __future__ import annotations

# How ranks exchange the feedback rows: all rows (bit-exact) or per-rank partial sums.
EXCHANGES = ("rows", "partial")
# Default bound on every wait for the other ranks (process group and index), in seconds: long
# enough for a rank to load or add a large shard between two collectives, short enough that a
# hung rank ends the job in minutes rather than torch's 10 (NCCL) or 30 (gloo).
DEFAULT_TIMEOUT_S = 300.0
# timedelta's own limit is about 2.7e15 s; a year is more than any collective can need.
MAX_TIMEOUT_S = 365 * 86400
