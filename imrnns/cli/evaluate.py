"""``python -m imrnns.cli.evaluate``: evaluate a checkpoint or TREC runs on a BEIR folder.

The same evaluation as ``imrnns evaluate`` (metrics, TREC runs in and out, Holm-adjusted
tests, bootstrap intervals), with the options of :func:`imrnns.evaluate.evaluate_beir`
spelled out; ``--checkpoint`` has no default here (base encoder alone when omitted).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from imrnns._json import finite
from imrnns.cli import add_debug_argument, evaluation_kwargs, evaluation_options, guarded
from imrnns.evaluate import MODES, evaluate_beir, format_table


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imrnns.cli.evaluate --data DIR [--checkpoint PATH]``: table or JSON."""
    parser = argparse.ArgumentParser(prog="python -m imrnns.cli.evaluate")
    parser.add_argument("--data", required=True, help="BEIR folder")
    parser.add_argument("--checkpoint", default=None, help="adapter directory or official .pt")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train-split", default="train",
                        help="qrels defining seen-doc/unseen-doc queries ('none' to skip)")  # fmt: skip
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--feedback-k", type=int, default=100)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--per-query", default=None, help="write per-query metrics (.tsv/.json)")
    parser.add_argument("--json", action="store_true")
    add_debug_argument(parser)
    evaluation_options(parser)
    args = parser.parse_args(argv)
    result = evaluate_beir(
        args.data, args.checkpoint, split=args.split, modes=args.mode,
        feedback_k=args.feedback_k,
        train_split=None if args.train_split.lower() == "none" else args.train_split,
        encoder=args.encoder, cache_dir=args.cache, per_query_path=args.per_query,
        show_progress=not args.json, **evaluation_kwargs(args),
    )  # fmt: skip
    if args.json:
        print(json.dumps(finite(result), indent=2, sort_keys=True, allow_nan=False))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded(main, "python -m imrnns.cli.evaluate"))
