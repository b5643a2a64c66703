"""Train IMRNN adapters on frozen-encoder embeddings of a BEIR folder.

``python -m imrnns.cli.train --data DIR --out DIR [--set key=value ...]`` prints the
training summary of :func:`imrnns.training.train_from_beir` as JSON. ``imrnns train`` runs
the same training with the command line's common options (``--json``, named
``--modulation`` / ``--seed`` / ``--epochs``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from imrnns._json import finite
from imrnns.cli import add_debug_argument, guarded
from imrnns.training import parse_overrides, train_from_beir

PROG = "python -m imrnns.cli.train"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imrnns.cli.train --data DIR --out DIR [--set key=value ...]``: print JSON."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="BEIR folder")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--cache", default=None, help="embedding cache folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides, e.g. modulation=affine dim=64")  # fmt: skip
    parser.add_argument("--refit", action="store_true", help="refit on all queries afterwards")
    parser.add_argument("--refit-epochs", type=int, default=None, metavar="N",
                        help="refit for N epochs instead of the selected epoch (implies --refit)")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    result = train_from_beir(
        args.data, args.out, split=args.split, encoder=args.encoder, cache_dir=args.cache,
        resume=not args.no_resume, progress=not args.no_progress, refit=args.refit,
        refit_epochs=args.refit_epochs,
        **overrides,
    )  # fmt: skip
    print(json.dumps(finite(result), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded(main, PROG))
