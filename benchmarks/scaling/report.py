"""Reports of a sweep: the Markdown tables, the log-log plot (matplotlib, imported only
here: an optional extra), and the atomic file writes behind them."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a killed run leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonable(x: Any) -> Any:
    """``json.dumps(default=...)``: numpy scalars, tensors and paths as plain JSON."""
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def _fmt_s(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms:.3f} ms"


def _fmt_n(n: int) -> str:
    """10000 -> "1e4", 30000 -> "3e4", 2017 -> "2.02e3", 500 -> "500"."""
    if n < 1000:
        return str(n)
    exp = math.floor(math.log10(n))
    mant = n / 10**exp
    return f"1e{exp}" if abs(mant - 1) < 1e-9 else f"{mant:.3g}e{exp}"


SKIP_SHORT = {
    "memory": "mem",
    "time": "time",
    "not_applicable": "n/a",
    "unavailable": "unavail.",
    "deadline": "deadline",
    "error": "error",
}


def markdown(doc: dict[str, Any]) -> str:
    """Tables: latency per (mode, modulation) with one column per provider; fused details
    (QPS, peak memory, bandwidth, FLOP/s, roofline); slopes; targets; correctness checks."""
    cfg, mach = doc["config"], doc["machine"]
    provs = [p for p in cfg["providers"] if any(q["provider"] == p for q in doc["points"])]
    lines = [
        f"# Scaling sweep: {doc['machine_name']}",
        "",
        f"Device: {mach['device_name']}; torch {mach['torch']}, triton {mach['triton']}, "
        f"faiss {mach['faiss']}; {mach['torch_threads']} torch threads. "
        f"Storage {cfg['dtype']}, m={cfg['dim']}, k={cfg['k']}, feedback_k={cfg['feedback_k']}, "
        f"per-point budget {cfg['budget_s']:g} s, up to {cfg['repeats']} timed calls "
        f"(median). Wall time {doc['wall_time_s'] / 60:.1f} min. Created {doc['created']}.",
        "",
        "Latency per call of B queries (median). Rerank = first stage (shared, "
        "top-feedback_k) + the provider's second stage. Skips: mem = estimated memory over "
        "what is available, time = predicted over the per-point budget, n/a = not applicable, "
        "unavail. = not installed here (reasons in the JSON).",
        "",
    ]
    for mode in cfg["modes"]:
        for mod in cfg["modulations"]:
            pts = [p for p in doc["points"] if p["mode"] == mode and p["modulation"] == mod]
            if not pts:
                continue
            lines += [f"## {mode}, {mod}", ""]
            lines.append("| N | B | " + " | ".join(provs) + " |")
            lines.append("|---:|---:|" + "---:|" * len(provs))
            keys = sorted({(p["n"], p["batch"]) for p in pts})
            for n, b in keys:
                cells = []
                for prov in provs:
                    p = next(
                        (q for q in pts if (q["n"], q["batch"], q["provider"]) == (n, b, prov)),
                        None,
                    )
                    if p is None:
                        cells.append("")
                    elif p["status"] == "ok":
                        cells.append(_fmt_s(p["latency_s"]))
                    else:
                        cells.append(SKIP_SHORT.get(p.get("skip_code", ""), "skip"))
                lines.append(f"| {_fmt_n(n)} | {b} | " + " | ".join(cells) + " |")
            lines.append("")
    fused = [p for p in doc["points"] if p["provider"] == "fused" and p["status"] == "ok"]
    if fused:
        lines += [
            "## fused: throughput, memory, roofline",
            "",
            "| mode | modulation | N | B | latency | QPS | peak extra MiB | GB/s | GFLOP/s | roofline |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in fused:
            peak = p.get("peak_memory_bytes")
            gbps, fl, rf = (
                p.get("achieved_gbps"),
                p.get("achieved_flops"),
                p.get("roofline_fraction"),
            )
            lines.append(
                f"| {p['mode']} | {p['modulation']} | {_fmt_n(p['n'])} | {p['batch']} | "
                f"{_fmt_s(p['latency_s'])} | {p['qps']:.3g} | "
                f"{'' if peak is None else f'{peak / 2**20:.0f}'} | "
                f"{'' if gbps is None else f'{gbps:.3g}'} | "
                f"{'' if fl is None else f'{fl / 1e9:.3g}'} | "
                f"{'' if rf is None else f'{rf:.0%}'} |"
            )
        lines.append("")
    if doc["slopes"]:
        lines += [
            "## cost growth: slope of log latency vs log N",
            "",
            "| mode | modulation | B | provider | sizes | slope (all N) | slope (N >= 1e5) | rerank stage slope |",
            "|---|---|---:|---|---|---:|---:|---:|",
        ]
        for s in doc["slopes"]:
            large = "" if s["slope_large_n"] is None else f"{s['slope_large_n']:.2f}"
            stage = "" if s["stage_slope"] is None else f"{s['stage_slope']:.2f}"
            flag = " (superlinear)" if s["superlinear"] else ""
            lines.append(
                f"| {s['mode']} | {s['modulation']} | {s['batch']} | {s['provider']} | "
                f"{_fmt_n(s['n_min'])}..{_fmt_n(s['n_max'])} ({s['n_points']}) | "
                f"{s['slope']:.2f} | {large}{flag} | {stage} |"
            )
        lines.append("")
    t = doc.get("targets") or {}
    lines += ["## targets (measured in this run)", ""]
    if t.get("status") == "ok":
        sec = t["seconds"]
        lines += [
            f"Exhaustive, N={_fmt_n(t['n'])}, m={t['dim']}, fp32, B={t['batch']}, diagonal, "
            f"k={t['k']}: fused {_fmt_s(sec['fused']['median'])}, {t['floor_provider']} "
            f"{_fmt_s(sec[t['floor_provider']]['median'])}, naive {_fmt_s(sec['naive']['median'])}.",
            "",
            f"- fused / {t['floor_provider']}: {t['fused_vs_floor']:.2f} (target <= 2): "
            f"{'met' if t['fused_vs_floor_met'] else 'MISSED'}",
            f"- naive / fused: {t['naive_vs_fused']:.1f}x (target >= 5x): "
            f"{'met' if t['naive_vs_fused_met'] else 'MISSED'}",
        ]
        if t.get("fused_peak_extra_fraction_of_corpus") is not None:
            lines.append(
                f"- fused peak extra memory: {t['fused_peak_extra_fraction_of_corpus']:.1%} of the corpus"
            )
    else:
        lines.append(f"- kernel ratios: {t.get('status', 'not run')} {t.get('reason', '')}")
    g = t.get("gpu_memory_floor", {})
    if g.get("status") == "ok":
        lines.append(
            f"- one query at N={_fmt_n(g['n'])} (fused, exhaustive, diagonal): {_fmt_s(g['latency_s'])} "
            f"= {g['ratio']:.2f}x the memory floor {_fmt_s(g['memory_floor_s'])} (target <= 1.5): "
            f"{'met' if g['met'] else 'MISSED'}"
        )
    else:
        lines.append(f"- GPU memory floor at N=1e7: {g.get('status')} ({g.get('reason', '')})")
    lines.append("")
    if doc["checks"]:
        failed = [c for c in doc["checks"] if not c["passed"]]
        lines += [
            "## correctness checks (vs reference, before timing)",
            "",
            f"{len(doc['checks']) - len(failed)} of {len(doc['checks'])} passed"
            + (
                ": failed "
                + ", ".join(f"{c['mode']}/{c['modulation']}/{c['provider']}" for c in failed)
                if failed
                else "."
            ),
            "",
        ]
    return "\n".join(lines)


COLORS = {
    "fused": "tab:red",
    "reference": "tab:blue",
    "compiled_reference": "tab:cyan",
    "naive": "tab:orange",
    "faiss_flat": "tab:green",
    "torch_ip": "tab:olive",
    "official": "tab:purple",
}


def plot(doc: dict[str, Any], path: Path) -> None:
    """Log-log latency vs N, one line per provider; one panel per (mode, modulation, B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    rows = [(mode, mod) for mode in cfg["modes"] for mod in cfg["modulations"]]
    cols = cfg["batches"]
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(4.2 * len(cols), 3.3 * len(rows)), squeeze=False
    )
    for r, (mode, mod) in enumerate(rows):
        for c, b in enumerate(cols):
            ax = axes[r][c]
            for prov in cfg["providers"]:
                pts = sorted(
                    (p["n"], p["latency_s"])
                    for p in doc["points"]
                    if p["status"] == "ok"
                    and (p["mode"], p["modulation"], p["batch"], p["provider"])
                    == (mode, mod, b, prov)
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, "o-", color=COLORS.get(prov), label=prov, ms=4, lw=1.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{mode} / {mod} / B={b}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel("corpus size N")
            if c == 0:
                ax.set_ylabel("latency per call (s)")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles))
    fig.suptitle(
        f"{doc['machine']['device_name']}: {cfg['dtype']} corpus, m={cfg['dim']}, "
        f"k={cfg['k']}, feedback_k={cfg['feedback_k']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.035, 1, 0.98))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
