"""The sweep itself: correctness checks before any timing, the kernel-ratio targets, then
every (N, B, modulation, mode) point with every provider, timed interleaved; the result
document is rewritten after each point, so a run killed at its time limit keeps what it
measured."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.scaling.analysis import compare, fit_slopes, gpu_floor_target
from benchmarks.scaling.config import (
    DTYPES,
    MEMORY_HEADROOM,
    SCHEMA_VERSION,
    BenchAbort,
    ProviderUnavailable,
    SweepConfig,
)
from benchmarks.scaling.inputs import Corpus, build_corpus, faiss_module, make_model, unit_rows
from benchmarks.scaling.machine import (
    available_bytes,
    loadavg,
    machine_info,
    machine_slug,
    peak_memory,
    sync,
    time_call,
)
from benchmarks.scaling.planner import Planner, estimate_bytes, useful_work
from benchmarks.scaling.providers import (
    Problem,
    exhaustive_providers,
    first_stage_fn,
    first_stage_ids,
    load_official,
    query_state,
    rerank_providers,
    set_fused_backend,
)
from benchmarks.scaling.report import atomic_write, jsonable, markdown, plot
from imrnns import IMRNN

# The "tool" field of every result document: how to run the sweep again.
TOOL = "python -m benchmarks.scaling"


def time_providers(
    fns: dict[str, Callable[[], Any]],
    predicted: dict[str, float | None],
    device: str,
    budget_s: float,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Interleaved timing. A provider with a ``warmup`` method (a compilation) runs it first,
    outside every measurement (its seconds are kept as ``warmup_s``). Each provider's first
    call warms up (lazy inits) and gives its peak memory; it also counts as a timed call when it is long (predicted or measured
    over a tenth of the budget: warm-up effects are then negligible, and a second call would
    double the cost of the point). Then rounds of one call per provider, so load drifts on a
    shared machine hit every provider alike; a provider stops after ``repeats`` timed calls, or
    when one more call would take its total past ``budget_s`` (it always gets one)."""
    res: dict[str, dict[str, Any]] = {
        name: {"times": [], "peak": None, "error": None, "warmup_s": None} for name in fns
    }
    for name, fn in fns.items():
        try:
            warmup = getattr(fn, "warmup", None)
            if warmup is not None:
                t0 = time.perf_counter()
                warmup()
                sync(device)
                res[name]["warmup_s"] = time.perf_counter() - t0
            with peak_memory(device) as peak:
                t = time_call(fn, device)
            res[name]["peak"] = peak["bytes"]
            pred = predicted.get(name)
            if max(t, pred or 0.0) > budget_s / 10:
                res[name]["times"].append(t)
        except Exception as exc:  # record, go on: one provider must not sink the sweep
            # Drop the traceback: its frames would keep the failed call's tensors alive.
            res[name]["error"] = exc.with_traceback(None)
        if res[name]["error"] is not None:
            _free(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            r = res[name]
            if r["error"] is not None or len(r["times"]) >= repeats:
                continue
            if r["times"] and sum(r["times"]) + r["times"][-1] > budget_s:
                continue
            try:
                r["times"].append(time_call(fn, device))
            except Exception as exc:  # as above
                r["error"] = exc.with_traceback(None)
            if r["error"] is not None:
                _free(device)
    return res


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class Sweep:
    """Runs verification, targets and the sweep; accumulates the result document."""

    def __init__(self, cfg: SweepConfig, log: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = cfg.device
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.dtype = DTYPES[cfg.dtype]
        self.item = torch.finfo(self.dtype).bits // 8
        self.planner = Planner(cfg.budget_s)
        self.points: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        set_fused_backend(cfg.fused_backend)
        faiss_mod = faiss_module()
        if faiss_mod is not None and hasattr(faiss_mod, "omp_set_num_threads"):
            faiss_mod.omp_set_num_threads(torch.get_num_threads())
        self.machine = machine_info(cfg)
        self.name = cfg.machine or machine_slug(self.machine)
        self.out_dir = Path(cfg.out)
        self.models: dict[str, IMRNN] = {}
        self.officials: dict[str, tuple[torch.nn.Module | None, str | None]] = {}
        self.checks: list[dict[str, Any]] = []
        self.targets: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def model(self, modulation: str) -> IMRNN:
        if modulation not in self.models:
            self.models[modulation] = make_model(
                self.cfg.dim, modulation, self.cfg.seed, self.device
            )
            if "official" in self.cfg.providers:
                self.officials[modulation] = load_official(
                    self.models[modulation], self.cfg.install_official
                )
            else:
                self.officials[modulation] = (None, "not requested")
        return self.models[modulation]

    def queries(self, b: int) -> torch.Tensor:
        return unit_rows(b, self.cfg.dim, torch.float32, self.device, self.cfg.seed + 1000 + b)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def past_deadline(self) -> bool:
        return self.cfg.deadline_s is not None and self.elapsed() > self.cfg.deadline_s

    def budget(self) -> int:
        return available_bytes(self.device, self.cfg.max_memory_gb)

    # ------------------------------------------------------------------ verification
    def verify(self) -> list[dict[str, Any]]:
        """Every provider against the reference on a small problem (non-power-of-two N).

        Raises:
            BenchAbort: the fused provider's results are wrong.
        """
        cfg, dev = self.cfg, self.device
        n, b = 2000 + 17, 5
        k = min(cfg.k, 50)
        for modulation in cfg.modulations:
            model = self.model(modulation)
            corpus = build_corpus(n, cfg.dim, self.dtype, dev, cfg.seed + 7, True, self.budget())
            q = self.queries(b)
            tq, qt = query_state(model, corpus.data, q, cfg.feedback_k, cfg.seed, dev)
            official, why = self.officials[modulation]
            prob = Problem(corpus, model, official, why, q, tq, qt)
            for mode in cfg.modes:
                if mode == "rerank":
                    prob.fs_ids = first_stage_ids(corpus, q, min(cfg.feedback_k, n))
                    fns = rerank_providers(prob, k, dev)
                else:
                    fns = exhaustive_providers(prob, k, dev)
                with torch.no_grad():
                    ref = fns["reference"]()
                for name in ("fused", "compiled_reference", "naive", "official"):
                    if name not in cfg.providers or not callable(fns.get(name)):
                        continue
                    if name == "compiled_reference":
                        try:
                            with torch.no_grad():
                                got, want = fns[name](), ref
                        except ProviderUnavailable as exc:
                            self.log(
                                f"check {mode:10s} {modulation:8s} {name}: unavailable ({exc})"
                            )
                            continue
                    elif name == "official":
                        # The official model re-normalises its inputs: compare on fp32 rows,
                        # exactly unit, with the reference on the same rows.
                        c32 = Corpus(corpus.data.float())
                        p32 = Problem(c32, model, official, why, q, tq, qt, prob.fs_ids)
                        f32 = rerank_providers(p32, k, dev)
                        with torch.no_grad():
                            got, want = f32["official"](), f32["reference"]()
                    else:
                        with torch.no_grad():
                            got, want = fns[name](), ref
                    check = compare(got, want)
                    check.update(mode=mode, modulation=modulation, provider=name, n=n, batch=b)
                    self.checks.append(check)
                    status = "ok" if check["passed"] else "FAILED"
                    self.log(
                        f"check {mode:10s} {modulation:8s} {name:18s} vs reference: {status} "
                        f"(max |d score| {check['max_abs_score_diff']:.2e}, "
                        f"id agreement {check['id_agreement']:.4f})"
                    )
            del corpus
            _free(dev)
        bad = [c for c in self.checks if c["provider"] == "fused" and not c["passed"]]
        if bad:
            raise BenchAbort(f"fused results disagree with the reference: {bad}")
        return self.checks

    # ------------------------------------------------------------------ targets
    def run_targets(self) -> dict[str, Any]:
        """The kernel issues' ratios, measured in this run: exhaustive, N=target_n, fp32
        storage, B=target_batch, diagonal, k: fused vs the unmodulated floor (<= 2x) and
        fused vs naive (>= 5x). Calls are interleaved so load drifts hit all alike."""
        cfg, dev = self.cfg, self.device
        n, b, m = cfg.target_n, cfg.target_batch, cfg.dim
        need = n * m * 4 * 5  # corpus + the naive provider's (N, m) fp32 temporaries
        if need > MEMORY_HEADROOM * self.budget():
            self.targets = {"status": "skipped", "reason": f"needs ~{need / 2**30:.1f} GiB"}
            return self.targets
        model = self.model("diagonal")
        corpus = build_corpus(n, m, torch.float32, dev, cfg.seed + 3, True, self.budget())
        q = self.queries(b)
        tq, qt = query_state(model, corpus.data, q, cfg.feedback_k, cfg.seed, dev)
        fns = exhaustive_providers(Problem(corpus, model, None, None, q, tq, qt), cfg.k, dev)
        floor = "faiss_flat" if callable(fns["faiss_flat"]) else "torch_ip"
        chosen = {"fused": fns["fused"], floor: fns[floor], "naive": fns["naive"]}
        with torch.no_grad():
            with peak_memory(dev) as peak:
                fused_out = chosen["fused"]()
            naive_out = chosen["naive"]()
            chosen[floor]()
            sync(dev)
            times: dict[str, list[float]] = {name: [] for name in chosen}
            for r in range(3):
                for name, fn in chosen.items():
                    if name == "naive" and r >= 2:
                        continue  # the slowest: two calls are enough for its median
                    times[name].append(time_call(fn, dev))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        check = compare(fused_out, naive_out)
        corpus_bytes = corpus.nbytes
        self.targets = {
            "status": "ok",
            "n": n,
            "dim": m,
            "batch": b,
            "k": cfg.k,
            "dtype": "float32",
            "modulation": "diagonal",
            "floor_provider": floor,
            "seconds": {name: {"median": med[name], "all": times[name]} for name in chosen},
            "fused_vs_floor": med["fused"] / med[floor],
            "fused_vs_floor_target": 2.0,
            "fused_vs_floor_met": med["fused"] / med[floor] <= 2.0,
            "naive_vs_fused": med["naive"] / med["fused"],
            "naive_vs_fused_target": 5.0,
            "naive_vs_fused_met": med["naive"] / med["fused"] >= 5.0,
            "fused_peak_extra_bytes": peak["bytes"],
            "fused_peak_extra_fraction_of_corpus": None
            if peak["bytes"] is None
            else peak["bytes"] / corpus_bytes,
            "fused_matches_naive": check,
        }
        self.log(
            f"targets (N={n}, m={m}, fp32, B={b}, diagonal): fused {med['fused'] * 1e3:.1f} ms, "
            f"{floor} {med[floor] * 1e3:.1f} ms (ratio {self.targets['fused_vs_floor']:.2f}, "
            f"target <= 2), naive {med['naive'] * 1e3:.1f} ms "
            f"(speed-up {self.targets['naive_vs_fused']:.1f}x, target >= 5)"
        )
        del corpus, fns, chosen
        _free(dev)
        return self.targets

    # ------------------------------------------------------------------ sweep
    def _skip(self, base: dict[str, Any], provider: str, code: str, reason: str) -> None:
        self.points.append(
            {**base, "provider": provider, "status": "skipped", "skip_code": code, "reason": reason}
        )

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.verify:
            self.verify()
        if cfg.targets:
            self.run_targets()
        for n in cfg.sizes:
            self._run_size(n)
            self.write(with_plot=True)
        return self.write(with_plot=True)

    def _run_size(self, n: int) -> None:
        cfg, dev = self.cfg, self.device
        combos = [
            (b, mod, mode) for b in cfg.batches for mod in cfg.modulations for mode in cfg.modes
        ]
        corpus_bytes = n * cfg.dim * self.item
        reason = None
        if self.past_deadline():
            code, reason = "deadline", f"sweep deadline of {cfg.deadline_s:g} s reached"
        elif corpus_bytes > MEMORY_HEADROOM * self.budget():
            code = "memory"
            reason = (
                f"the corpus alone needs {corpus_bytes / 2**30:.1f} GiB, "
                f"{self.budget() / 2**30:.1f} GiB available"
            )
        if reason is not None:
            for b, mod, mode in combos:
                for prov in cfg.providers:
                    self._skip(self._base(n, b, mod, mode), prov, code, reason)
            self.log(f"N={n}: skipped ({reason})")
            return
        t0 = time.perf_counter()
        want_faiss = "faiss_flat" in cfg.providers or "rerank" in cfg.modes
        corpus = build_corpus(n, cfg.dim, self.dtype, dev, cfg.seed, want_faiss, self.budget())
        self.log(
            f"N={n}: corpus {corpus_bytes / 2**20:.0f} MiB {cfg.dtype} built in "
            f"{time.perf_counter() - t0:.1f} s"
            + ("" if corpus.faiss_index is not None else f" (no faiss: {corpus.faiss_reason})")
        )
        for b in cfg.batches:
            q = self.queries(b)
            fs = self._first_stage(corpus, q, n, b) if "rerank" in cfg.modes else None
            for mod in cfg.modulations:
                model = self.model(mod)
                for mode in cfg.modes:
                    base = self._base(n, b, mod, mode)
                    if self.past_deadline():
                        for prov in cfg.providers:
                            self._skip(
                                base,
                                prov,
                                "deadline",
                                f"sweep deadline of {cfg.deadline_s:g} s reached",
                            )
                        continue
                    self._run_group(base, corpus, model, q, fs)
                    self.write()  # a run killed at its time limit keeps what it measured
            del q
        del corpus
        _free(dev)

    def _base(self, n: int, b: int, modulation: str, mode: str) -> dict[str, Any]:
        return {"mode": mode, "modulation": modulation, "n": n, "batch": b}

    def _first_stage(self, corpus: Corpus, q: torch.Tensor, n: int, b: int) -> dict[str, Any]:
        """Time the shared first stage once per (N, B); its ids feed every rerank provider."""
        cfg, dev = self.cfg, self.device
        kf = min(cfg.feedback_k, n)
        engine, fn = first_stage_fn(corpus, q, kf)
        key = ("rerank", "first_stage", engine)
        pred, why = self.planner.check(key, n, b, 1.0)
        if why is not None:
            return {"engine": engine, "skip": ("time", f"first stage {engine}: {why}")}
        res = time_providers({engine: fn}, {engine: pred}, dev, cfg.budget_s, cfg.repeats)[engine]
        if res["error"] is not None:
            return {"engine": engine, "skip": ("error", f"first stage failed: {res['error']!r}")}
        med = statistics.median(res["times"])
        self.planner.record(key, n, b, med)
        ids = first_stage_ids(corpus, q, kf)
        self.log(f"  N={n} B={b}: first stage {engine} {med * 1e3:.2f} ms")
        return {
            "engine": engine,
            "seconds": med,
            "times": res["times"],
            "peak": res["peak"],
            "ids": ids,
        }

    def _run_group(
        self,
        base: dict[str, Any],
        corpus: Corpus,
        model: IMRNN,
        q: torch.Tensor,
        fs: dict[str, Any] | None,
    ) -> None:
        cfg, dev = self.cfg, self.device
        mode, mod, n, b = base["mode"], base["modulation"], base["n"], base["batch"]
        if mode == "rerank":
            assert fs is not None
            if "skip" in fs:
                for prov in cfg.providers:
                    self._skip(base, prov, *fs["skip"])
                self.log(f"  N={n} B={b} {mod} {mode}: all skipped ({fs['skip'][1]})")
                return
        official, official_why = self.officials[mod]
        if mode == "exhaustive":
            tq, qt = query_state(model, corpus.data, q, cfg.feedback_k, cfg.seed, dev)
            prob = Problem(corpus, model, official, official_why, q, tq, qt)
            fns = exhaustive_providers(prob, cfg.k, dev)
        else:
            prob = Problem(corpus, model, official, official_why, q, q, q, fs["ids"])
            fns = rerank_providers(prob, cfg.k, dev)
        kf = min(cfg.feedback_k, n)
        budget = self.budget()
        runnable: dict[str, Callable[[], Any]] = {}
        predicted: dict[str, float | None] = {}
        n_exp = 1.0 if mode == "exhaustive" else 0.0
        for prov in cfg.providers:
            fn = fns.get(prov)
            if not callable(fn):
                code, reason = fn if fn is not None else ("not_applicable", "no such provider here")
                self._skip(base, prov, code, reason)
                continue
            need = estimate_bytes(prov, mode, mod, n, b, cfg.dim, kf, self.item, dev)
            if need > MEMORY_HEADROOM * budget:
                self._skip(
                    base,
                    prov,
                    "memory",
                    f"needs ~{need / 2**30:.1f} GiB (estimated), {budget / 2**30:.1f} GiB available",
                )
                continue
            pred, why = self.planner.check((mode, mod, prov), n, b, n_exp)
            if why is not None:
                self._skip(base, prov, "time", why)
                continue
            runnable[prov], predicted[prov] = fn, pred
        with torch.no_grad():
            results = time_providers(runnable, predicted, dev, cfg.budget_s, cfg.repeats)
        for prov, res in results.items():
            point = {**base, "provider": prov}
            err = res["error"]
            if isinstance(err, ProviderUnavailable):
                self._skip(base, prov, "unavailable", str(err))
                continue
            if err is not None:
                oom = isinstance(
                    err, (MemoryError, torch.OutOfMemoryError)
                ) or "out of memory" in str(err)
                code = "memory" if oom else "error"
                self._skip(base, prov, code, f"{type(err).__name__}: {str(err)[:300]}")
                if not oom:
                    self.log(f"  {prov} failed: {err!r}")
                continue
            times = res["times"]
            stage = statistics.median(times)
            self.planner.record((mode, mod, prov), n, b, stage)
            latency = stage
            if mode == "rerank":
                latency = stage + fs["seconds"]
                point.update(first_stage=fs["engine"], first_stage_s=fs["seconds"], stage_s=stage)
            point.update(
                status="ok",
                latency_s=latency,
                min_s=min(times) + (fs["seconds"] if mode == "rerank" else 0.0),
                times_s=times,
                repeats=len(times),
                qps=b / latency,
                peak_memory_bytes=res["peak"],
            )
            if res["warmup_s"] is not None:
                point["warmup_s"] = res["warmup_s"]
            if mode == "rerank" and prov == fs["engine"]:
                point["peak_memory_bytes"] = fs["peak"]
            point.update(self._roofline(prov, mode, mod, n, b, latency, corpus))
            self.points.append(point)
        summary = ", ".join(
            f"{p['provider']} {p['latency_s'] * 1e3:.3g} ms"
            if p["status"] == "ok"
            else f"{p['provider']} skip({p['skip_code']})"
            for p in self.points
            if all(p[key] == base[key] for key in base)
        )
        self.log(f"  N={n} B={b} {mod} {mode}: {summary}")

    def _roofline(
        self, prov: str, mode: str, mod: str, n: int, b: int, latency: float, corpus: Corpus
    ) -> dict[str, Any]:
        fs_item = 4 if corpus.faiss_index is not None else self.item
        bytes_, flops = useful_work(prov, mode, mod, n, b, self.cfg.dim, self.item, fs_item)
        peak_bw = self.machine.get("peak_gbps")
        peak_flops = self.machine.get("peak_flops")
        out: dict[str, Any] = {"bytes": bytes_, "flops": flops}
        if mode == "exhaustive" and prov in ("reference", "compiled_reference", "naive"):
            out["flops"] = None  # they do other (more) work: their FLOP/s would mislead
        mem_floor = bytes_ / (peak_bw * 1e9) if bytes_ and peak_bw else None
        comp_floor = flops / peak_flops if flops and peak_flops else None
        floors = [f for f in (mem_floor, comp_floor) if f is not None]
        out.update(
            achieved_gbps=bytes_ / latency / 1e9 if bytes_ else None,
            achieved_flops=out["flops"] / latency if out["flops"] else None,
            memory_floor_s=mem_floor,
            compute_floor_s=comp_floor,
            roofline_fraction=max(floors) / latency if floors else None,
            memory_floor_ratio=latency / mem_floor if mem_floor else None,
        )
        return out

    # ------------------------------------------------------------------ outputs
    def document(self) -> dict[str, Any]:
        cfg = asdict(self.cfg)
        slopes = fit_slopes(self.points)
        targets = dict(self.targets)
        targets["gpu_memory_floor"] = gpu_floor_target(self.points, self.device)
        self.machine["load_average_end"] = loadavg()
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": TOOL,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine_name": self.name,
            "machine": self.machine,
            "config": cfg,
            "checks": self.checks,
            "targets": targets,
            "points": self.points,
            "slopes": slopes,
            "wall_time_s": self.elapsed(),
        }

    def write(self, with_plot: bool = False) -> dict[str, Any]:
        """Write JSON and Markdown (and the plot when ``with_plot``); return the document."""
        doc = self.document()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / self.name
        atomic_write(stem.with_suffix(".json"), json.dumps(doc, indent=1, default=jsonable) + "\n")
        atomic_write(stem.with_suffix(".md"), markdown(doc))
        if self.cfg.plot and with_plot:
            plot(doc, stem.with_suffix(".png"))
        doc["files"] = {
            "json": str(stem.with_suffix(".json")),
            "markdown": str(stem.with_suffix(".md")),
            "plot": str(stem.with_suffix(".png")) if self.cfg.plot else None,
        }
        return doc
