"""Cost models and planning: the peak memory each provider materialises, the useful work of
the roofline columns, and the predictions that skip what would exceed the time budget."""

from __future__ import annotations

from dataclasses import dataclass, field


def transform_width(m: int, modulation: str) -> int:
    """OUT, the width of one transform: 2m (diagonal) or m^2 + m (affine)."""
    return 2 * m if modulation == "diagonal" else m * m + m


def estimate_bytes(
    provider: str,
    mode: str,
    modulation: str,
    n: int,
    b: int,
    m: int,
    kf: int,
    item: int,
    device: str,
) -> int:
    """Peak extra memory of one call, from the shapes each provider materialises.

    ``compiled_reference`` is charged as the reference it compiles: what the compiler fuses
    away depends on its version, and an estimate must not be low.
    """
    out = transform_width(m, modulation)
    f4 = 4
    small = 64 << 20
    if mode == "exhaustive":
        if provider == "fused":
            # Chunked: a few chunk-sized buffers per worker (GPU: a 64 MiB score buffer).
            return int(min(0.3 * n * m * item, 256 << 20)) + small
        if provider in ("reference", "compiled_reference"):
            # (B, N, m): gathered rows, fp32 copy, transformed, LayerNormed, normalised.
            return b * n * (m * (4 * f4 + item) + 32) + small
        if provider == "naive":
            return n * m * f4 * (3 + (item != 4)) + 8 * n + small
        if provider == "torch_ip":
            return 4 * b * min(n, 1 << 20) * f4 + (1 << 15) * m * f4 + small
        return small
    rows = b * kf
    if provider == "fused":
        return rows * m * f4 * 4 + b * out * f4 * 4 + small
    if provider in ("reference", "compiled_reference", "naive"):
        return rows * out * f4 * 2 + rows * m * f4 * 6 + rows * 192 * f4 * 2 + small
    if provider == "official":
        return rows * out * f4 * 3 + rows * m * f4 * 10 + small
    return small


def useful_work(
    provider: str, mode: str, modulation: str, n: int, b: int, m: int, item: int, fs_item: int
) -> tuple[float | None, float | None]:
    """(bytes that must be read, FLOPs) of the computation, for the roofline columns.

    Exhaustive: the corpus is read once (one pass per block of queries is the ideal); the
    diagonal algebra is 8 m multiply-adds per (document, query) (6 atoms dotted with d, 2 with
    d*d), affine m^2 + 6 m. Floors: 2 m per (document, query). Rerank: the first-stage scan
    (2 m per document and query); the candidate stage is negligible beside it at large N."""
    if mode == "exhaustive":
        if provider in ("faiss_flat", "torch_ip"):
            bytes_ = n * m * (4 if provider == "faiss_flat" else item)
            return float(bytes_), 2.0 * n * m * b
        per = 8 * m if modulation == "diagonal" else m * m + 6 * m
        return float(n * m * item), 2.0 * n * b * per
    return float(n * m * fs_item), 2.0 * n * m * b


@dataclass
class Planner:
    """Predicts one call's time from the smaller sizes and decides what to skip.

    Exhaustive cost and the first stage grow linearly with N (and at most linearly with B);
    a rerank second stage touches B x feedback_k rows whatever N is, so it is carried over
    unchanged. Every prediction names its basis in the skip reason."""

    budget_s: float
    history: dict[tuple[str, ...], list[tuple[int, int, float]]] = field(default_factory=dict)
    too_slow: dict[tuple[str, ...], list[tuple[int, int, str]]] = field(default_factory=dict)

    def record(self, key: tuple[str, ...], n: int, b: int, seconds: float) -> None:
        self.history.setdefault(key, []).append((n, b, seconds))

    def mark_slow(self, key: tuple[str, ...], n: int, b: int, why: str) -> None:
        self.too_slow.setdefault(key, []).append((n, b, why))

    def predict(
        self, key: tuple[str, ...], n: int, b: int, n_exponent: float
    ) -> tuple[float, str] | None:
        """(predicted seconds of one call at (n, b), its basis), or None with no history."""
        hist = self.history.get(key, [])
        same_b = [(n0, b0, t) for n0, b0, t in hist if b0 == b and n0 <= n]
        if same_b:
            n0, b0, t = max(same_b)
            return t * (n / n0) ** n_exponent, f"{t:.3g} s measured at N={n0}, B={b0}"
        smaller = [(n0 * b0, n0, b0, t) for n0, b0, t in hist if n0 <= n and b0 <= b]
        if smaller:
            _, n0, b0, t = max(smaller)
            pred = t * (n / n0) ** n_exponent * (b / b0)
            return pred, f"{t:.3g} s measured at N={n0}, B={b0}"
        return None

    def check(
        self, key: tuple[str, ...], n: int, b: int, n_exponent: float
    ) -> tuple[float | None, str | None]:
        """(predicted seconds or None, skip reason or None)."""
        for n0, b0, why in self.too_slow.get(key, []):
            if n0 <= n and b0 <= b:
                return None, f"already over the time budget at N={n0}, B={b0} ({why})"
        pred = self.predict(key, n, b, n_exponent)
        if pred is None:
            return None, None
        seconds, basis = pred
        if seconds > self.budget_s:
            why = (
                f"predicted {seconds:.3g} s per call > per-point budget {self.budget_s:g} s "
                f"(linear extrapolation from {basis})"
            )
            self.mark_slow(key, n, b, why)
            return seconds, why
        return seconds, None
