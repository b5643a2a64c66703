"""One-off studies, each behind a figure in ``benchmarks/RESULTS.md``; every script's docstring
names the figure it reproduces and the command (``python -m experiments.<name>``)."""
