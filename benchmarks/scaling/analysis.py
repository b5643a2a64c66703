"""Checks and fits over results: a provider's top-k against the reference, log-log slopes of
latency against N, and the GPU one-query memory-floor target."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.scaling.config import CHECK_ATOL, CHECK_MIN_ID_AGREEMENT, LARGE_N, SUPERLINEAR


def _as_torch(x: Any) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def compare(got: tuple[Any, Any], want: tuple[Any, Any]) -> dict[str, Any]:
    """Top-k results against the reference: sorted scores must agree within ``CHECK_ATOL``
    (they do not depend on how ties are broken) and ids on >= ``CHECK_MIN_ID_AGREEMENT`` of
    each row's set (a near-tie at the cut may swap one document)."""
    gs, gi = (_as_torch(t).detach().cpu() for t in got)
    ws, wi = (_as_torch(t).detach().cpu() for t in want)
    if gs.shape != ws.shape:
        return {"passed": False, "max_abs_score_diff": float("inf"), "id_agreement": 0.0,
                "detail": f"shapes {tuple(gs.shape)} vs {tuple(ws.shape)}"}  # fmt: skip
    diff = float((gs.float() - ws.float()).abs().max()) if gs.numel() else 0.0
    agree = []
    for a, b in zip(gi.tolist(), wi.tolist(), strict=True):
        sa, sb = set(a) - {-1}, set(b) - {-1}
        agree.append(len(sa & sb) / max(1, len(sb)))
    agreement = float(np.mean(agree)) if agree else 1.0
    ok = diff <= CHECK_ATOL and agreement >= CHECK_MIN_ID_AGREEMENT
    return {"passed": bool(ok), "max_abs_score_diff": diff, "id_agreement": agreement,
            "atol": CHECK_ATOL}  # fmt: skip


def loglog_fit(ns: list[float], ts: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, r^2) of log10(t) = slope * log10(N) + intercept, least squares."""
    x = np.log10(np.asarray(ns, dtype=np.float64))
    y = np.log10(np.asarray(ts, dtype=np.float64))
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(slope), float(intercept), r2


def fit_slopes(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slope of latency vs N per (mode, modulation, batch, provider), log-log least squares.

    ``slope`` uses every measured size; ``slope_large_n`` only N >= 1e5, where fixed per-call
    costs no longer dominate: the asymptotic growth. Linear cost gives 1 (exhaustive, and a
    rerank's first stage at large N); the rerank second stage alone (``stage_slope``) should
    be about 0. Above 1.15 is flagged ``superlinear``."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for p in points:
        if p["status"] == "ok":
            groups.setdefault((p["mode"], p["modulation"], p["batch"], p["provider"]), []).append(p)
    out = []
    for (mode, mod, b, prov), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda p: p["n"])
        ns = [p["n"] for p in pts]
        if len(set(ns)) < 2:
            continue
        slope, _, r2 = loglog_fit(ns, [p["latency_s"] for p in pts])
        row: dict[str, Any] = {
            "mode": mode,
            "modulation": mod,
            "batch": b,
            "provider": prov,
            "n_points": len(pts),
            "n_min": ns[0],
            "n_max": ns[-1],
            "slope": slope,
            "r2": r2,
            "slope_large_n": None,
            "stage_slope": None,
        }
        large = [p for p in pts if p["n"] >= LARGE_N]
        if len({p["n"] for p in large}) >= 2:
            row["slope_large_n"] = loglog_fit(
                [p["n"] for p in large], [p["latency_s"] for p in large]
            )[0]
        if mode == "rerank" and all("stage_s" in p for p in pts):
            stages = [max(p["stage_s"], 1e-9) for p in pts]
            row["stage_slope"] = loglog_fit(ns, stages)[0]
        asym = row["slope_large_n"] if row["slope_large_n"] is not None else slope
        row["superlinear"] = bool(asym > SUPERLINEAR)
        out.append(row)
    return out


def gpu_floor_target(points: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """One query (B=1), exhaustive, diagonal, fused, the smallest N >= 1e7: latency within 1.5x
    of the memory floor (corpus bytes / device bandwidth)."""
    if device != "cuda":
        return {"status": "not_measured", "reason": "needs a CUDA GPU"}
    cand = [
        p
        for p in points
        if p["status"] == "ok"
        and p["mode"] == "exhaustive"
        and p["modulation"] == "diagonal"
        and p["provider"] == "fused"
        and p["batch"] == 1
        and p["n"] >= 10_000_000
    ]
    if not cand:
        return {"status": "not_measured", "reason": "no fused exhaustive B=1 point at N >= 1e7"}
    p = min(cand, key=lambda p: p["n"])
    ratio = p.get("memory_floor_ratio")
    return {
        "status": "ok",
        "n": p["n"],
        "latency_s": p["latency_s"],
        "memory_floor_s": p.get("memory_floor_s"),
        "ratio": ratio,
        "target": 1.5,
        "met": bool(ratio is not None and ratio <= 1.5),
    }
