"""Inputs of a sweep point: random unit rows (a projected corpus and queries), a perturbed
model, and the corpus with its first-stage faiss index. Built outside every timing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.scaling.config import MEMORY_HEADROOM
from imrnns import IMRNN, IMRNNConfig


def unit_rows(
    n: int, m: int, dtype: torch.dtype, device: str, seed: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, m) random unit rows (projected embeddings), generated in slabs to bound memory."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, m, dtype=dtype, device=device) if out is None else out
    slab = 1 << (20 if device == "cuda" else 16)
    for r0 in range(0, n, slab):
        rows = min(slab, n - r0)
        x = torch.randn(rows, m, generator=gen, device=device)
        out[r0 : r0 + rows] = F.normalize(x, dim=1)
    return out


def make_model(m: int, modulation: str, seed: int, device: str) -> IMRNN:
    """An IMRNN with n = m, an identity projector (so the stored unit rows are their own
    projection and the official model, loading the same weights, sees the same function) and
    perturbed HyperNets and LayerNorms, so nothing reduces to an identity shortcut."""
    model = IMRNN(IMRNNConfig(input_dim=m, modulation=modulation)).eval()
    gen = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("projector"):
                continue
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(device)


@dataclass
class Corpus:
    """The projected corpus in its storage dtype, and the first-stage index over it."""

    data: torch.Tensor
    faiss_index: Any = None
    faiss_reason: str | None = None

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def faiss_module() -> Any:
    """The faiss module, or None where it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_corpus(
    n: int, m: int, dtype: torch.dtype, device: str, seed: int, want_faiss: bool, budget: int
) -> Corpus:
    """Generate the corpus; on request build a faiss ``IndexFlatIP`` over its fp32 values.

    The faiss index is filled in place (``codes.resize`` then a numpy view), so building it
    costs its N x m x 4 bytes and nothing transient; with fp32 storage on the CPU the torch
    corpus *is* a view of the faiss codes (one copy in memory).
    """
    faiss = faiss_module()
    item = torch.finfo(dtype).bits // 8
    need_faiss = want_faiss and faiss is not None
    reason = None if faiss is not None else "faiss is not installed"
    fs_bytes = n * m * 4
    if need_faiss and device == "cuda" and not hasattr(faiss, "StandardGpuResources"):
        need_faiss, reason = False, "faiss-gpu is not installed (a CPU faiss scan is no GPU floor)"
    if need_faiss and device == "cpu" and dtype != torch.float32:
        corpus_bytes = n * m * item
        if corpus_bytes + fs_bytes > MEMORY_HEADROOM * budget:
            need_faiss = False
            reason = (
                f"faiss IndexFlatIP needs {fs_bytes / 2**30:.1f} GiB fp32 beside the "
                f"{corpus_bytes / 2**30:.1f} GiB corpus; {budget / 2**30:.1f} GiB available"
            )
    if not need_faiss:
        return Corpus(unit_rows(n, m, dtype, device, seed), None, reason)
    index = faiss.IndexFlatIP(m)
    index.codes.resize(fs_bytes)
    index.ntotal = n
    view = faiss.rev_swig_ptr(index.codes.data(), fs_bytes).view(np.float32).reshape(n, m)
    fp32 = torch.from_numpy(view)
    if device == "cpu" and dtype == torch.float32:
        unit_rows(n, m, dtype, device, seed, out=fp32)
        return Corpus(fp32, index)
    data = unit_rows(n, m, dtype, device, seed)
    step = 1 << 18
    for r0 in range(0, n, step):
        fp32[r0 : r0 + step].copy_(data[r0 : r0 + step].float().cpu())
    if device == "cuda":
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        gpu_index._imrnns_res = res  # keep the resources alive with the index
        return Corpus(data, gpu_index)
    return Corpus(data, index)
