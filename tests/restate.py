"""An independent, loop-by-loop float64 re-statement of the IMRNN maths (docs/design.md section 1).

Written from the equations, sharing no code with the library, so that the model, the ops and
the checkpoint import are checked against something that could disagree with them.
"""

from __future__ import annotations

import math

import torch


def _proj(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = sd["projector.weight"] @ x + sd["projector.bias"]
    return y / max(float(y.norm()), 1e-12)


def _mlp(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(sd[f"{prefix}.hypernet.0.weight"] @ x + sd[f"{prefix}.hypernet.0.bias"])
    h = torch.relu(sd[f"{prefix}.hypernet.3.weight"] @ h + sd[f"{prefix}.hypernet.3.bias"])
    return sd[f"{prefix}.hypernet.6.weight"] @ h + sd[f"{prefix}.hypernet.6.bias"]


def _transform(o: torch.Tensor, x: torch.Tensor, modulation: str) -> torch.Tensor:
    m = x.shape[0]
    if modulation == "diagonal":
        return x * torch.sigmoid(o[:m]) + torch.tanh(o[m:])
    return o[: m * m].reshape(m, m) @ x + o[m * m :]


def _act(o: torch.Tensor, m: int, modulation: str) -> torch.Tensor:
    if modulation == "diagonal":
        return torch.cat([torch.sigmoid(o[:m]), torch.tanh(o[m:])])
    return o


def _apply_act(a: torch.Tensor, x: torch.Tensor, modulation: str) -> torch.Tensor:
    m = x.shape[0]
    if modulation == "diagonal":
        return x * a[:m] + a[m:]
    return a[: m * m].reshape(m, m) @ x + a[m * m :]


def _ln(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return (x - mu) / math.sqrt(float(var) + eps) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (max(float(a.norm()), 1e-12) * max(float(b.norm()), 1e-12))


def restate_scores(
    state: dict[str, torch.Tensor],
    query: torch.Tensor,
    candidates: torch.Tensor,
    *,
    modulation: str = "diagonal",
    aggregation: str = "mean_of_transforms",
    weights: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Scores (K,) of one query (n,) against its candidates (K, n), all in float64."""
    sd = {k: v.double() for k, v in state.items()}
    q, cands = query.double(), candidates.double()
    k = cands.shape[0]
    w = torch.ones(k, dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum()
    pq = _proj(sd, q)
    m = pq.shape[0]
    pds = [_proj(sd, c) for c in cands]
    oq = _mlp(sd, "query_hypernet", pq)
    d_tilde = [_ln(sd, "doc_norm", _transform(oq, pd, modulation), eps) for pd in pds]
    if aggregation == "mean_of_transforms":
        mean_act = sum(
            w[i] * _act(_mlp(sd, "doc_hypernet", pds[i]), m, modulation) for i in range(k)
        )
        q_mod = _apply_act(mean_act, pq, modulation)
    else:  # transform_of_mean (official v0.1)
        mean_doc = sum(w[i] * d_tilde[i] for i in range(k))
        q_mod = _transform(_mlp(sd, "doc_hypernet", mean_doc), pq, modulation)
    q_tilde = _ln(sd, "query_norm", q_mod, eps)
    return torch.tensor([_cos(q_tilde, d) for d in d_tilde], dtype=torch.float64)
