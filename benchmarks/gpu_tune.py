"""Where the exhaustive GPU search spends its time, and which block shapes are fastest.

Run by ``benchmarks/gpu_run.sh`` after the correctness check (``benchmarks/gpu_check.py``)
and before the sweep; it prints, it changes nothing. At N = 10^7, m = 256, bf16 storage, k =
100 (the issue's GPU target shape) it times, with ``triton.testing.do_bench`` (median):

1. the floors: the sweep's bandwidth measurement
   (:func:`benchmarks.scaling.machine.measure_copy_gbps`, read + write counted) over the
   corpus's bytes, and a plain read (``corpus.sum``);
2. the scoring kernels alone (no top-k) for B = 1 (row kernel) and B = 32 (dot kernel)
   under a few block shapes, the shipped one first, each checked against the shipped one's
   scores;
3. the whole ``modulated_topk`` call for B = 1 .. 256, and with the row/dot switch
   (:data:`imrnns_kernels.scoring.triton.SMALL_BATCH`) forced either way, so the
   top-k's share and the switch point are visible;
4. the whole call for B = 32 and 256 with 1x, 4x and 16x the default chunk (fewer merges of
   the streaming top-k, each with its host syncs, against a larger score buffer).

Every measurement is independent: one that fails prints its error and the rest go on.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    """``--interpret-smoke``: the same steps on CPU through Triton's interpreter at N = 500,
    timed with a wall clock (needs TRITON_INTERPRET=1): tests this script without a GPU."""
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--interpret-smoke" in argv
    if smoke != (os.environ.get("TRITON_INTERPRET", "0") == "1"):
        print("gpu_tune: --interpret-smoke goes with TRITON_INTERPRET=1, and only it")
        return 2
    import time

    import torch
    import triton

    if not smoke and not torch.cuda.is_available():
        print("gpu_tune: no CUDA GPU")
        return 2
    import imrnns_kernels as K
    from benchmarks.scaling.inputs import make_model
    from benchmarks.scaling.machine import measure_copy_gbps
    from imrnns_kernels import topk
    from imrnns_kernels.scoring import moments
    from imrnns_kernels.scoring import triton as scoring_triton
    from imrnns_kernels.testing import unit_rows

    n, m, k = (500 if smoke else 10_000_000), 256, 100
    dev = torch.device("cpu" if smoke else "cuda")
    corpus = unit_rows(n, m, torch.bfloat16, dev.type, 1)
    nbytes = corpus.numel() * corpus.element_size()
    model = make_model(m, "diagonal", 0, dev.type)
    ln_w, ln_b = model.doc_norm.weight.detach(), model.doc_norm.bias.detach()
    where = "Triton interpreter on CPU" if smoke else torch.cuda.get_device_name(0)
    print(f"gpu_tune: {where}, N={n:.0e}, m={m}, bf16 "
          f"({nbytes / 1e9:.2f} GB), triton {triton.__version__}", flush=True)  # fmt: skip

    def ms(fn: Callable[[], object]) -> float:
        if smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=40, return_mode="median"))

    def report(name: str, fn: Callable[[], object], floor_ms: float | None = None) -> float | None:
        try:
            t = ms(fn)
        except Exception as exc:  # keep going: every line is independent
            print(f"  {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            traceback.print_exc(limit=2)
            return None
        extra = f" = {t / floor_ms:.2f}x the copy floor" if floor_ms else ""
        print(f"  {name}: {t:.3f} ms, {nbytes / t / 1e6:.0f} GB/s of corpus{extra}", flush=True)
        return t

    # 1. floors
    print("floors:", flush=True)
    # The sweep's floor: the corpus bytes at its measured copy rate (read + write counted).
    copy_gbps = measure_copy_gbps(dev.type, nbytes)
    floor = nbytes / copy_gbps / 1e6
    print(f"  copy: {copy_gbps:.0f} GB/s read + write; one read of the corpus at that rate: "
          f"{floor:.3f} ms", flush=True)  # fmt: skip
    report("corpus.sum (a plain read)", lambda: corpus.sum(dtype=torch.float32), floor)

    def queries(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = unit_rows(b, m, torch.float32, dev.type, 2 + b)
        with torch.no_grad():
            pq = model.project(q)
            tq = model.query_transform(pq)
            return tq.float().contiguous(), pq.float().contiguous()

    # 2a. row kernel, B = 1
    print("row kernel (B=1), scores only:", flush=True)
    tq, q = queries(1)
    out = torch.empty(1, n, dtype=torch.float32, device=dev)
    lw, lb = ln_w.float().contiguous(), ln_b.float().contiguous()

    shipped = scoring_triton._rows_blocks(m, compiled=True)

    def rows_launch(block_n: int, warps: int, dst: torch.Tensor) -> None:
        scoring_triton._diag_rows_chunk(
            corpus, tq, lw, lb, q, dst, 0, n, 1e-5, (block_n, shipped[1], warps)
        )

    rows_launch(shipped[0], shipped[2], out)
    want = out.clone()
    alternatives = [(16, 4), (8, 2), (32, 8), (64, 4), (64, 8)]
    rows_cfgs = [(shipped[0], shipped[2])] + [
        c for c in alternatives if c[0] != shipped[0] or c[1] != shipped[2]
    ]
    for block_n, warps in rows_cfgs:
        try:
            rows_launch(block_n, warps, out)
            ok = torch.equal(out, want)
        except Exception as exc:
            print(f"  BLOCK_N={block_n} warps={warps}: FAILED {exc}", flush=True)
            continue
        tag = " (shipped)" if (block_n, warps) == (shipped[0], shipped[2]) else ""
        report(f"BLOCK_N={block_n:3d} warps={warps}{tag}{'' if ok else ' MISMATCH'}",
               lambda bn=block_n, w=warps: rows_launch(bn, w, out), floor)  # fmt: skip
    report("torch.topk(k=100) of the (1, N) scores", lambda: torch.topk(want, k, dim=1), floor)
    report("chunk_topk (topk + tie check) of them", lambda: topk.chunk_topk(want, k), floor)

    # 2b. the dot kernel, B = 32
    print("dot kernel (B=32), scores only, whole corpus in chunks of the shipped size:",
          flush=True)  # fmt: skip
    b = 32
    tq, q = queries(b)
    atoms = moments.diagonal_atoms(tq, ln_w, ln_b, q, torch.float32)
    consts = atoms.consts.contiguous()
    lin, quad = scoring_triton.dot_operands(atoms)
    chunk = min(n, max(1024, scoring_triton.SCORE_BUFFER_BYTES // (4 * b)))
    out = torch.empty(b, chunk, dtype=torch.float32, device=dev)
    ill = torch.zeros(1, dtype=torch.int32, device=dev)

    def dot_all(cfg: tuple[int, int, int, int, int] | None, rows: int = n) -> None:
        for start in range(0, rows, chunk):
            scoring_triton._diag_chunk(
                corpus, lin, quad, consts, out, ill, start, min(chunk, rows - start), 1e-5, cfg
            )

    shipped_dot = scoring_triton._diag_blocks(m, b, compiled=True)
    dot_all(shipped_dot, chunk)
    want = out.clone()
    alternatives = [(64, 32, 16, 8, 3), (64, 32, 16, 4, 3), (128, 32, 16, 8, 3),
                    (64, 32, 32, 8, 3), (128, 32, 32, 4, 2)]  # fmt: skip
    for cfg in [shipped_dot] + [c for c in alternatives if c != shipped_dot]:
        try:
            dot_all(cfg, chunk)
            err = float((out - want).abs().max())
        except Exception as exc:
            print(f"  {cfg}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        tag = " (shipped)" if cfg == shipped_dot else ""
        report(f"(BLOCK_N, BLOCK_B, BLOCK_I, warps, stages)={cfg}{tag} max|diff|={err:.1e}",
               lambda c=cfg: dot_all(c), floor)  # fmt: skip
    print(f"  ill-conditioned pairs flagged: {int(ill.item())}", flush=True)

    # 3. whole calls
    shipped_small = scoring_triton.SMALL_BATCH
    print(f"modulated_topk end to end (fused backend, SMALL_BATCH={shipped_small}):", flush=True)
    cases = [(b, "", shipped_small) for b in (1, 2, 4, 8, 16, 32, 64, 256)]
    cases += [(4, " dot kernel", 1), (8, " dot kernel", 1), (16, " row kernel", 16)]
    for b, label, small in cases:
        tq, q = queries(b)
        scoring_triton.SMALL_BATCH = small
        try:
            with K.use_backend("triton"):
                report(f"B={b:3d}{label}",
                       lambda t=tq, qq=q: K.modulated_topk(corpus, t, ln_w, ln_b, qq, k),
                       floor)  # fmt: skip
        finally:
            scoring_triton.SMALL_BATCH = shipped_small

    # 4. the streaming top-k's share: fewer, larger chunks (the op's chunk_rows argument)
    print("modulated_topk, chunk size (rows per score buffer):", flush=True)
    for b in (32, 256):
        tq, q = queries(b)
        default = max(1024, scoring_triton.SCORE_BUFFER_BYTES // (4 * b))
        for rows in sorted({min(n, default), min(n, 4 * default), min(n, 16 * default)}):
            report(f"B={b:3d} chunk_rows={rows}{' (default)' if rows == min(n, default) else ''}",
                   lambda t=tq, qq=q, r=rows: scoring_triton.modulated_topk(
                       corpus, t, ln_w, ln_b, qq, k, chunk_rows=r), floor)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
