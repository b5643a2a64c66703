"""Command line: ``imrnns encode | search | evaluate | train | explain | demo`` (also ``python -m imrnns``).

Every command has ``--help``; ``--json`` prints one machine-readable JSON object on stdout
(progress bars and logs go to stderr). An error is one line on stderr and exit status 2
(:func:`guarded`); ``--debug`` or ``IMRNNS_DEBUG=1`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imrnns._json import finite
from imrnns.explain.methods import DEFAULT_METHOD as DEFAULT_EXPLAIN_METHOD
from imrnns.explain.methods import WORD_METHODS
from imrnns.pretrained import default_adapter

DEFAULT_ENCODER = "minilm"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _encoder(name: str, cache: str | None, quiet: bool = False) -> Any:
    from imrnns.encoders import resolve_encoder

    return resolve_encoder(name, cache or None, show_progress=not quiet)


def _emit(payload: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(finite(payload), indent=2, sort_keys=False, default=_jsonable,
                         allow_nan=False))  # fmt: skip
    else:
        print(text)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --------------------------------------------------------------------------- encode
def cmd_encode(args: argparse.Namespace) -> int:
    from imrnns.data import load_beir

    data = load_beir(args.data, args.split)
    enc = _encoder(args.encoder, args.cache, args.json)
    t0 = time.perf_counter()
    docs = enc.encode_document(data.corpus_texts)
    queries = enc.encode_query(data.query_texts)
    secs = time.perf_counter() - t0
    out = None
    if args.out:
        from imrnns._atomic import atomic_file

        out = Path(args.out)
        with atomic_file(out) as fh:
            np.savez(
                fh,
                corpus=docs,
                queries=queries,
                corpus_ids=np.array(data.corpus_ids),
                query_ids=np.array(data.query_ids),
            )
    payload = {
        "encoder": enc.name,
        "fingerprint": enc.fingerprint,
        "documents": int(docs.shape[0]),
        "queries": int(queries.shape[0]),
        "dim": int(docs.shape[1]),
        "seconds": round(secs, 3),
        "out": str(out) if out else None,
    }
    _emit(
        payload,
        args.json,
        f"encoded {docs.shape[0]} documents and {queries.shape[0]} queries "
        f"({docs.shape[1]}-d, {enc.name}) in {secs:.1f} s" + (f" -> {out}" if out else ""),
    )
    return 0


# --------------------------------------------------------------------------- search
def _build_index(args: argparse.Namespace, enc: Any) -> Any:
    from imrnns import IMRNN, IMRNNIndex
    from imrnns.data import load_beir
    from imrnns.evaluate import index_similarity

    if args.index:
        return IMRNNIndex.load(args.index)
    data = load_beir(args.data, args.split)
    model = IMRNN.from_pretrained(args.checkpoint or default_adapter())
    index = IMRNNIndex(
        model,
        feedback_k=args.feedback_k,
        first_stage=args.first_stage,
        storage_dtype=args.storage_dtype,
        encoder=enc.fingerprint,
        similarity=index_similarity(enc),
    )
    index.add(enc.encode_document(data.corpus_texts), doc_ids=data.corpus_ids)
    if args.save_index:
        index.save(args.save_index)
    return index


def workspace_bytes_arg(value: str) -> int:
    """``--workspace-mb``: a positive number of MiB, as the int byte count the API takes."""
    try:
        mib = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {value!r}") from None
    if not mib > 0 or mib == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, got {value!r}")
    return max(1, int(mib * (1 << 20)))


def cmd_search(args: argparse.Namespace) -> int:
    if getattr(args, "distributed", False):
        from imrnns.cli.distributed import run_distributed_search

        return run_distributed_search(args, encoder=_encoder, emit=_emit)
    enc = _encoder(args.encoder, args.cache, args.json)
    index = _build_index(args, enc)
    # One-off query texts: caching each distinct list would litter the cache.
    q = enc.encode_query(args.query, cache=False)
    t0 = time.perf_counter()
    scores, ids = index.search(
        q,
        k=args.k,
        mode=args.mode,
        encoder=enc.fingerprint,
        workspace_bytes=getattr(args, "workspace_mb", None),
    )
    ms = (time.perf_counter() - t0) * 1e3
    # String ids (documents added with doc_ids=) come back as names; "id" stays the row.
    row_of = {name: r for r, name in enumerate(index.doc_ids or ())}
    results = []
    lines = []
    for text, srow, irow in zip(args.query, scores, ids, strict=True):
        hits = [
            {
                "rank": r + 1,
                "id": row_of[i] if isinstance(i, str) else int(i),
                "doc_id": i if isinstance(i, str) else None,
                "score": float(s),
            }
            for r, (s, i) in enumerate(zip(srow, irow, strict=True))
            if isinstance(i, str) or (i is not None and i >= 0)
        ]
        results.append({"query": text, "hits": hits})
        lines.append(f"query: {text}")
        lines += [f"  {h['rank']:>3}  {h['score']:+.4f}  {h['doc_id'] or h['id']}" for h in hits]
    _emit(
        {"mode": args.mode, "k": args.k, "milliseconds": round(ms, 3), "results": results},
        args.json,
        "\n".join(lines),
    )
    return 0


# --------------------------------------------------------------------------- evaluate / train
def evaluation_options(sp: argparse.ArgumentParser) -> None:
    """Metrics, TREC runs and statistics options of ``imrnns evaluate`` (and of
    ``python -m imrnns.cli.evaluate``)."""
    sp.add_argument(
        "--metrics", nargs="+", default=None, metavar="MEASURE",
        help="measures as ir-measures names them, e.g. \"nDCG@10 R@100 RR@10 P@5 AP\" "
        "(default: nDCG@10 Recall@100 MRR@10, BEIR's names for nDCG@10 R@100 RR@10; each is "
        "reported under the name given)",
    )  # fmt: skip
    sp.add_argument("--depth", type=int, default=100,
                    help="documents retrieved per query, raised to the largest cut-off "
                    "(default 100; measures without a cut-off, such as AP, see this many)")  # fmt: skip
    sp.add_argument("--ignore-identical-ids", action="store_true",
                    help="drop a retrieved document whose id equals the query id, as BEIR's "
                    "EvaluateRetrieval does (ArguAna, Quora); off by default")  # fmt: skip
    sp.add_argument("--run", action="append", default=None, metavar="PATH",
                    help="score this TREC run file too (repeatable); without --checkpoint "
                    "the adapter is not evaluated")  # fmt: skip
    sp.add_argument("--baseline", default=None, metavar="PATH",
                    help="test every system against this TREC run instead of the base "
                    "encoder (with --run and no --checkpoint nothing is encoded)")  # fmt: skip
    sp.add_argument("--run-out", default=None, metavar="PATH",
                    help="write each computed ranking as a TREC run; {system} in PATH is "
                    "replaced by base / imrnn-rerank / imrnn-exhaustive, else the name is "
                    "inserted before the suffix when there are several")  # fmt: skip
    sp.add_argument("--permutations", type=int, default=10000,
                    help="randomisation-test permutations (default 10000)")  # fmt: skip
    sp.add_argument("--bootstrap", type=int, default=10000,
                    help="bootstrap resamples of the overall differences (0: none; "
                    "default 10000)")  # fmt: skip
    sp.add_argument("--seed", type=int, default=0, help="seed of both tests (default 0)")
    sp.add_argument("--alpha", type=float, default=0.05,
                    help="level of the * marker, on Holm-adjusted p (default 0.05)")  # fmt: skip


def evaluation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`imrnns.evaluate.evaluate_beir` arguments of :func:`evaluation_options`."""
    return {
        "metrics": None if args.metrics is None else " ".join(args.metrics),
        "depth": args.depth,
        "ignore_identical_ids": args.ignore_identical_ids,
        "runs": args.run,
        "baseline": args.baseline,
        "run_out": args.run_out,
        "permutations": args.permutations,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "alpha": args.alpha,
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imrnns.evaluate import evaluate_beir, format_table

    checkpoint = args.checkpoint
    if checkpoint is None and not (args.run or args.baseline):
        checkpoint = default_adapter()
    payload = evaluate_beir(
        data_dir=args.data,
        split=args.split,
        checkpoint=checkpoint,
        mode=args.mode,
        encoder=args.encoder,
        cache_dir=args.cache,
        feedback_k=args.feedback_k,
        per_query_out=args.per_query,
        show_progress=not args.json,
        **evaluation_kwargs(args),
    )
    _emit(payload, args.json, "" if args.json else format_table(payload))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from imrnns.training import parse_overrides, train_from_beir

    overrides = parse_overrides(args.set)
    # The named options win over the same key in --set only when given.
    for key in ("modulation", "seed", "epochs"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    payload = train_from_beir(
        data_dir=args.data,
        split=args.split,
        out_dir=args.out,
        encoder=args.encoder,
        cache_dir=args.cache,
        resume=not args.no_resume,
        refit=args.refit,
        refit_epochs=args.refit_epochs,
        show_progress=not args.json,
        **overrides,
    )
    _emit(payload, args.json, json.dumps(payload, indent=2, default=_jsonable))
    return 0


# --------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    """Token-level explanations: of each query's top documents, or of given pairs."""
    from imrnns import IMRNN
    from imrnns.data import load_beir
    from imrnns.explain import (
        CorpusVocabulary,
        Explainer,
        WordExplainer,
        format_table,
        render_html,
    )

    if args.top_k <= 0 or args.k <= 0:
        raise ValueError(f"--top-k and --k must be positive, got {args.top_k} and {args.k}")
    # --no-filter is the paper's plain back-projection, whatever --method says.
    backprojection = args.no_filter or args.method == "backprojection"
    enc = _encoder(args.encoder, args.cache, args.json)
    data = load_beir(args.data, args.split)
    queries = list(args.query)
    q_emb = enc.encode_query(queries, cache=False)
    if args.document is not None:
        # Given pairs: each query with the document, which is also its feedback set.
        model = IMRNN.from_pretrained(args.checkpoint or default_adapter())
        index, feedback = None, None
        qt, dt, ids = queries, [args.document] * len(queries), None
        d_emb = enc.encode_document(dt, cache=False)
    else:
        index = _build_index(args, enc)
        model, feedback = index.model, index
        _, hits = index.search(q_emb, k=args.k, mode=args.mode, encoder=enc.fingerprint)
        texts = dict(zip(data.corpus_ids, data.corpus_texts, strict=True))
        names = index.doc_ids or data.corpus_ids
        # String ids (documents added with doc_ids=) come back as names: map them to rows.
        row_of = {name: r for r, name in enumerate(names)}
        rows = [
            (r, row_of[i] if isinstance(i, str) else int(i))
            for r in range(len(queries))
            for i in hits[r]
            if isinstance(i, str) or (i is not None and i >= 0)
        ]
        qt = [queries[r] for r, _ in rows]
        ids = [names[i] for _, i in rows]
        dt = [texts.get(name, "") for name in ids]
        q_emb = q_emb[[r for r, _ in rows]]
        if args.index:
            # A loaded index keeps projected documents only: encode the hits' texts.
            d_emb = enc.encode_document(dt, cache=False)
        else:
            # _build_index just encoded this corpus: a cache hit, row i is document i.
            d_emb = enc.encode_document(data.corpus_texts)[[i for _, i in rows]]
    t0 = time.perf_counter()
    if backprojection:
        vocab = CorpusVocabulary.from_texts(data.corpus_texts, enc.tokenizer)
        explainer = Explainer(model, enc.token_embeddings(), enc.tokenizer, idf=vocab)
        t0 = time.perf_counter()
        explanations = explainer.explain(
            q_emb,
            d_emb,
            top_k=args.top_k,
            filter=not args.no_filter,
            query_texts=qt,
            doc_texts=dt,
            doc_ids=ids,
            feedback=feedback,
        )
    else:
        # Through the encoder: the texts are what is explained; the embeddings just made
        # score the pairs.
        explanations = WordExplainer(model, enc, method=args.method).explain(
            qt,
            dt,
            top_k=args.top_k,
            doc_ids=ids,
            feedback=feedback,
            query_embeddings=q_emb,
            doc_embeddings=d_emb,
        )
    ms = (time.perf_counter() - t0) * 1e3
    html_path = None
    if args.html:
        html_path = Path(args.html).resolve()
        render_html(explanations, html_path)
        _log(f"wrote {html_path}")
        if args.open:
            import webbrowser

            webbrowser.open(html_path.as_uri())
    first = explanations[0] if explanations else None
    payload = {
        "method": first.method if first else None,
        "token_scores": first.to_dict()["token_scores"] if first else None,
        "faithfulness": first.faithfulness if first else None,
        "feedback": "document" if index is None else f"index (feedback_k={index.feedback_k})",
        "milliseconds": round(ms, 3),
        "html": str(html_path) if html_path else None,
        "explanations": [e.to_dict() for e in explanations],
    }
    _emit(payload, args.json, format_table(explanations))
    return 0


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from imrnns.demo import run_demo

    payload, text = run_demo(
        checkpoint=args.checkpoint,
        encoder=args.encoder,
        cache_dir=args.cache,
        feedback_k=args.feedback_k,
        show_progress=not args.json,
    )
    _emit(payload, args.json, text)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from imrnns.data import scifact_path

    p = argparse.ArgumentParser(prog="imrnns", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, data: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        add_debug_argument(sp)
        sp.add_argument(
            "--encoder",
            default=DEFAULT_ENCODER,
            help="encoder preset name or local model folder (default: minilm)",
        )
        sp.add_argument(
            "--cache",
            default=None,
            help="embedding cache folder (default: $IMRNNS_CACHE or ~/.cache/imrnns/embeddings)",
        )
        if data:
            sp.add_argument(
                "--data",
                default=str(scifact_path()),
                help="BEIR folder (default: the vendored SciFact)",
            )
            sp.add_argument("--split", default="test", help="qrels split (default: %(default)s)")

    def index_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--checkpoint",
            default=None,
            help="adapter: our directory or an official .pt (default: the shipped SciFact adapter)",
        )
        sp.add_argument(
            "--feedback-k", type=int, default=100, help="feedback set size (default 100)"
        )
        sp.add_argument("--mode", choices=("rerank", "exhaustive"), default="rerank")

    sp = sub.add_parser("encode", help="encode a BEIR folder (cached on disk)")
    common(sp)
    sp.add_argument("--out", default=None, help="also write the embeddings to this .npz")
    sp.set_defaults(func=cmd_encode)

    sp = sub.add_parser("search", help="search a corpus with IMRNN for one or more query texts")
    common(sp)
    index_opts(sp)
    sp.add_argument("query", nargs="+", help="query text(s)")
    sp.add_argument("--k", type=int, default=10)
    sp.add_argument("--index", default=None, help="load a saved index instead of building one")
    sp.add_argument("--save-index", default=None, help="save the built index here")
    sp.add_argument(
        "--workspace-mb",
        type=workspace_bytes_arg,
        default=None,
        metavar="MIB",
        help="bound on the exhaustive scan's extra memory, in MiB (all worker threads "
        "together; default: about 15%% of the corpus)",
    )
    sp.add_argument("--first-stage", choices=("flat", "ivf", "hnsw"), default="flat")
    sp.add_argument(
        "--storage-dtype", choices=("float32", "float16", "bfloat16"), default="float32"
    )
    from imrnns.cli._distributed_args import add_distributed_arguments

    add_distributed_arguments(sp)
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser(
        "evaluate",
        help="any ir-measures metric (default nDCG@10 / Recall@100 / MRR@10), base vs IMRNN "
        "or TREC runs, Holm-corrected tests and bootstrap intervals",
    )
    common(sp)
    sp.add_argument(
        "--checkpoint",
        default=None,
        help="adapter: our directory or an official .pt (default: the shipped SciFact adapter, "
        "unless --run or --baseline is given)",
    )
    sp.add_argument("--feedback-k", type=int, default=100, help="feedback set size (default 100)")
    sp.add_argument("--mode", nargs="+", choices=("rerank", "exhaustive"), default="rerank",
                    help="one or both IMRNN modes (default rerank)")  # fmt: skip
    evaluation_options(sp)
    sp.add_argument(
        "--per-query",
        default=None,
        help="write per-query metrics here (JSON if it ends in .json, else TSV)",
    )
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("train", help="train an adapter on a BEIR folder")
    common(sp)
    sp.set_defaults(split="train")
    sp.add_argument("--out", required=True, help="output directory (checkpoints each epoch)")
    sp.add_argument("--modulation", choices=("diagonal", "affine"), default=None,
                    help="modulation form (default: diagonal)")  # fmt: skip
    sp.add_argument("--seed", type=int, default=None,
                    help="random seed (default 42, the shipped adapter's)")  # fmt: skip
    sp.add_argument("--epochs", type=int, default=None)
    sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="any TrainConfig field, e.g. loss=margin pseudo_queries=title "
                    "(values parsed as JSON, else kept as strings)")  # fmt: skip
    sp.add_argument("--refit", action="store_true",
                    help="then retrain on all queries of the split for the selected epochs")  # fmt: skip
    sp.add_argument("--refit-epochs", type=int, default=None, metavar="N",
                    help="refit for N epochs instead of the selected epoch (implies --refit)")  # fmt: skip
    sp.add_argument("--no-resume", action="store_true",
                    help="start afresh instead of continuing an interrupted run in --out")  # fmt: skip
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "explain",
        help="which words of the query and document drive the adapter's score",
    )
    common(sp)
    index_opts(sp)
    sp.add_argument("query", nargs="+", help="query text(s)")
    sp.add_argument(
        "--document",
        default=None,
        help="explain each query with this document text (its own feedback set) instead of "
        "searching the corpus",
    )
    sp.add_argument("--k", type=int, default=3, help="top documents explained per query")
    sp.add_argument("--top-k", type=int, default=10, help="tokens per side (default 10)")
    sp.add_argument(
        "--method",
        choices=(*WORD_METHODS, "backprojection"),
        default=DEFAULT_EXPLAIN_METHOD,
        help=f"how each word's signed effect on the adapter's added score is found (default "
        f"{DEFAULT_EXPLAIN_METHOD}, chosen by benchmarks/explain_faithfulness.py; occlusion "
        "is exact but costs an encoder pass per word), or the paper's back-projection of the "
        "modulation ('backprojection', filtered to the pair's words)",
    )
    sp.add_argument(
        "--no-filter",
        action="store_true",
        help="the paper's plain back-projection: keep fragments, stop words and unsupported "
        "tokens (implies --method backprojection)",
    )
    sp.add_argument("--html", default=None, help="write an HTML report to this file")
    sp.add_argument("--open", action="store_true", help="open the HTML report in a browser")
    sp.add_argument("--index", default=None, help="load a saved index instead of building one")
    sp.set_defaults(func=cmd_explain, first_stage="flat", storage_dtype="float32", save_index=None)

    sp = sub.add_parser("demo", help="the main job: SciFact end to end with MiniLM")
    common(sp, data=False)
    sp.add_argument("--checkpoint", default=None, help="adapter (default: the shipped one)")
    sp.add_argument("--feedback-k", type=int, default=100)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded(lambda: args.func(args), f"imrnns {args.command}", debug=args.debug)


DEBUG_ENV = "IMRNNS_DEBUG"
# Bad input (ValueError, TypeError), the environment (OSError: a missing file, a full disk, no
# permission, a rank that timed out; MemoryError), and the libraries' own failures: RuntimeError
# (faiss, torch, an out-of-memory, a failed rank of a distributed run), AssertionError (faiss's
# Python wrappers check their arguments with assert). SafetensorError is added on first use.
REPORTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OSError,
    MemoryError,
    RuntimeError,
    AssertionError,
)
_DEBUG_HINT = f"(--debug or {DEBUG_ENV}=1 shows the traceback)"


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """``--debug``: an error shows its traceback instead of one line (also ``IMRNNS_DEBUG=1``)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on an error, show the full traceback instead of one line (also {DEBUG_ENV}=1)",
    )


def _debug_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _reported_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError  # a plain Exception subclass

    return (*REPORTED_ERRORS, SafetensorError)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: its message for bad input and OSError, else with its type name
    and how to see the traceback (an empty message: the type name alone)."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if message and isinstance(exc, ValueError | TypeError | OSError):
        return message
    name = type(exc).__name__
    return f"{name}: {message} {_DEBUG_HINT}" if message else f"{name} {_DEBUG_HINT}"


def guarded(run: Callable[[], int], prog: str, debug: bool | None = None) -> int:
    """Run a command: an error is one line on stderr and exit status 2, not a traceback.

    Reported this way: :data:`REPORTED_ERRORS` and SafetensorError (bad input, missing or
    damaged files, the disk, memory, the libraries' failures, a failed rank). Any other
    exception (AttributeError, KeyError, ...) is a programming error and keeps its
    traceback. With ``debug`` (``--debug``; None: ``--debug`` among ``sys.argv``) or
    ``IMRNNS_DEBUG=1`` every error keeps its traceback. Also the entry of
    ``python -m imrnns.cli.train`` / ``imrnns.cli.evaluate``.
    """
    if debug is None:
        debug = "--debug" in sys.argv[1:]
    try:
        return int(run())
    except Exception as exc:
        if debug or _debug_env() or not isinstance(exc, _reported_errors()):
            raise
        _log(f"{prog}: error: {error_line(exc)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
