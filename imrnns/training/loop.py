"""The training loop: :func:`train` and what it needs around it.

Model set-up (projector initialisation, frozen parts), AdamW with a linear warm-up / decay
schedule, the weight average, per-epoch validation and selection, and checkpoints:
``out/best/``, ``out/last/`` (model and trainer state, swapped in atomically) and
``out/training.json``. A killed run restarted with the same arguments resumes from ``last/``
to the same weights.

Tested in tests/training/test_train.py (determinism, resume, selection) and tests/retriever/test_faults.py
(runs killed mid-epoch and mid-checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from imrnns._atomic import (
    SaveLayout,
    atomic_directory,
    atomic_file,
    check_replaceable,
    resolve_directory,
)
from imrnns._checkpoint_io import CHECKPOINT_LAYOUT
from imrnns._json import finite
from imrnns.checkpoints import load_pretrained, save_pretrained
from imrnns.model import IMRNN
from imrnns.training.batches import _epoch_batches, _epoch_generator, _pseudo_schedule
from imrnns.training.config import TrainConfig
from imrnns.training.data import TrainingData
from imrnns.training.losses import _step_loss
from imrnns.training.validation import _selection_value, base_validation, validate

__all__ = ["STATE_NAME", "SUMMARY_NAME", "train"]

STATE_NAME = "trainer_state.pt"
SUMMARY_NAME = "training.json"
# ``out/last``: the model (a checkpoint, whose config.json is the header) and the trainer
# state. A run replaces ``out/last`` and ``out/best`` only when they are earlier saves of
# these layouts (imrnns._atomic.check_replaceable).
LAST_LAYOUT = SaveLayout(
    kind="training checkpoint",
    header="model/config.json",
    format=CHECKPOINT_LAYOUT.format,
    max_version=CHECKPOINT_LAYOUT.max_version,
    files=CHECKPOINT_LAYOUT.nested("model") | {STATE_NAME},
)


def _lr_lambda(total: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        rest = max(1, total - warmup_steps)
        return max(0.0, (total - step) / rest)

    return f


def _init_projector(model: IMRNN, corpus: torch.Tensor, how: str) -> None:
    """Initialise ``p(x) = normalize(P x + p0)`` (see ``TrainConfig.projector_init``)."""
    n, m = model.config.input_dim, model.config.working_dim
    if how == "auto":
        how = "identity" if m == n else "pca"
    if how == "random":
        return
    with torch.no_grad():
        if how == "identity":
            if m != n:
                raise ValueError(
                    f"projector_init='identity' needs dim == input_dim, got {m} != {n}"
                )
            model.projector.weight.copy_(torch.eye(n))
            model.projector.bias.zero_()
            return
        x = torch.nn.functional.normalize(corpus.double(), dim=1)
        mean = x.mean(dim=0)
        cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        top = vecs[:, -m:].flip(1).T  # (m, n), largest first
        # eigh's signs are arbitrary: fix each row's largest entry positive (reproducible).
        signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
        top = top * signs
        model.projector.weight.copy_(top.float())
        model.projector.bias.copy_(-(top @ mean).float())


def _saved_config(saved: Any) -> Any:
    """A saved run's config as ``TrainConfig.to_dict`` gives it now: fields added since it
    was saved take their defaults (which reproduce the old behaviour)."""
    try:
        return TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return saved


def _ema_copy(model: IMRNN) -> IMRNN:
    ema = IMRNN(model.config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    return ema.eval()


def _ema_update(ema: IMRNN, model: IMRNN, decay: float, step: int) -> None:
    """``ema = d * ema + (1 - d) * model`` with the warm-up ``d = min(decay, (1+t)/(10+t))``."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.mul_(d).add_(p, alpha=1.0 - d)
            else:
                e.copy_(p)


def _save_last(out: Path, model: IMRNN, state: dict[str, Any]) -> None:
    """Model and trainer state together, atomically (one directory swapped in).

    ``out/last`` is replaced only when it is an earlier ``last/`` (:data:`LAST_LAYOUT`).
    """
    with atomic_directory(out / "last", LAST_LAYOUT) as tmp:
        save_pretrained(model, tmp / "model")
        torch.save(state, tmp / STATE_NAME)


def _write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    with atomic_file(out / SUMMARY_NAME, "w") as fh:
        json.dump(finite(summary), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")


def _load_last(out: Path) -> tuple[IMRNN, dict[str, Any]] | None:
    try:
        last = resolve_directory(out / "last")
    except FileNotFoundError:
        return None
    state_path = last / STATE_NAME
    if not state_path.is_file():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    return load_pretrained(last / "model"), state


def train(
    data: TrainingData,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train an adapter on prepared data; write checkpoints to ``out_dir``.

    Args:
        data: from :func:`prepare_training_data`.
        out_dir: output directory (its layout is in :mod:`imrnns.training`).
        config: the run's settings (default :class:`TrainConfig`).
        resume: continue from ``out_dir/last`` when it holds a run with the same config and
            data; a finished run is not retrained. False starts over.
        progress: tqdm progress bar with the loss and the validation nDCG@10.
        callback: called as ``callback(epoch, record)`` after each epoch's checkpoint.
        stop_after: stop after this many epochs (the learning-rate schedule still spans
            ``config.epochs``): a refit on all queries (``holdout=False`` data, no
            validation) for the epoch count a validated run selected. Without validation
            queries ``best/`` is the last epoch.

    Returns:
        A plain dict: ``checkpoint`` (path of ``best/``), ``best_epoch``,
        ``best_selection_value``, ``best_validation`` (metrics), ``base_validation``,
        ``history`` (per epoch: loss, validation metrics, seconds), ``train_seconds``,
        ``config``, ``data``, ``resumed_from_epoch``.

    Raises:
        ValueError: ``out_dir/last`` holds a run with another config or other data, or
            ``out_dir/last`` / ``out_dir/best`` exist and are not earlier saves of a run
            (they would be replaced: nothing is written then).
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    # Refuse before any work, not after the first epoch: the run replaces both.
    check_replaceable(out / "last", LAST_LAYOUT)
    check_replaceable(out / "best", CHECKPOINT_LAYOUT)
    out.mkdir(parents=True, exist_ok=True)
    n = int(data.corpus.shape[1])
    steps_per_epoch = data.steps_per_epoch(config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    torch.manual_seed(config.seed)
    model = IMRNN(config.model_config(n))
    _init_projector(model, data.corpus, config.projector_init)
    for part in config.frozen_parts:
        getattr(model, part).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, round(config.warmup * total_steps))
    )
    # The weight average (TrainConfig.ema_decay): a copy of the model that validation,
    # selection and best/ use; its parameters follow the trained ones after every step.
    ema = _ema_copy(model) if config.ema_decay > 0 else None
    has_val = bool(data.val.ids)
    base_val = base_validation(data) if has_val else {}
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after <= 0):  # fmt: skip
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    last_epoch = config.epochs if stop_after is None else min(stop_after, config.epochs)
    state: dict[str, Any] = {
        "config": config.to_dict(),
        "fingerprint": data.fingerprint,
        "epoch": 0,
        "history": [],
        "best_value": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "finished": False,
        "train_seconds": 0.0,
        "last_epoch": last_epoch,
        "step": 0,
    }
    resumed_from = None
    loaded = _load_last(out) if resume else None
    if loaded is not None:
        last_model, last_state = loaded
        if (
            _saved_config(last_state.get("config")) != config.to_dict()
            or last_state.get("last_epoch", last_epoch) != last_epoch
        ):
            raise ValueError(
                f"{out / 'last'} holds a run with another config; use another out_dir or "
                f"resume=False. Saved: {last_state.get('config')}; now: {config.to_dict()}"
            )
        if last_state.get("fingerprint") != data.fingerprint:
            raise ValueError(
                f"{out / 'last'} holds a run on other data (fingerprint mismatch); use another "
                "out_dir or resume=False"
            )
        model.load_state_dict(last_model.state_dict())
        if ema is not None:
            ema.load_state_dict(last_state["ema"])
        optimizer.load_state_dict(last_state["optimizer"])
        scheduler.load_state_dict(last_state["scheduler"])
        state.update({k: v for k, v in last_state.items()
                      if k not in ("optimizer", "scheduler", "ema")})  # fmt: skip
        resumed_from = int(state["epoch"])

    corpus_unit = torch.nn.functional.normalize(data.corpus, dim=1)
    if state["epoch"] == 0 and not state["history"]:
        # Epoch 0: the untrained adapter (the identity-initialised model), the reference
        # every later epoch must beat to be selected.
        metrics = validate(model, data, config.feedback_k) if has_val else None
        value = _selection_value(metrics, config.selection, base_val) if metrics else 0.0
        state["history"].append({"epoch": 0, "loss": None, "validation": metrics,
                                 "selection_value": value if has_val else None,
                                 "seconds": 0.0})  # fmt: skip
        state["best_value"], state["best_epoch"] = value, 0
        save_pretrained(model, out / "best")
    if "step" not in state:  # runs saved before the weight average counted steps
        state["step"] = state["epoch"] * steps_per_epoch

    # Multi-threaded CPU scatter-adds (the backward of corpus[ids]) sum in a varying order,
    # so two runs (or a run and its resumption) would drift apart. Deterministic algorithms
    # remove that (warn_only: CUDA ops without a deterministic version warn instead of
    # failing).
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    bar = tqdm(
        total=last_epoch * steps_per_epoch,
        initial=min(state["epoch"], last_epoch) * steps_per_epoch,
        desc=f"train {config.modulation}",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        while not state["finished"] and state["epoch"] < last_epoch:
            epoch = state["epoch"] + 1
            t0 = time.perf_counter()
            gen = _epoch_generator(config.seed, epoch)
            torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout, if configured
            pseudo_rows, pseudo_gen = _pseudo_schedule(data, config, epoch, steps_per_epoch)
            model.train()
            losses = []
            # No enumerate(): it keeps its last item, so a streamed chunk would outlive its
            # batches while the next chunk is mined.
            step = -1
            for queries, rows in _epoch_batches(data, config, gen):
                step += 1
                optimizer.zero_grad(set_to_none=True)
                loss = _step_loss(model, data, rows, config, gen, corpus_unit,
                                  pseudo_rows[step], pseudo_gen, queries)  # fmt: skip
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    _ema_update(ema, model, config.ema_decay, state["step"])
                state["step"] += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}",
                                val_ndcg=_fmt(state["history"][-1]["validation"]))  # fmt: skip
                del queries  # freed before the next chunk is mined: one chunk in memory
            model.eval()
            chosen = model if ema is None else ema
            metrics = validate(chosen, data, config.feedback_k) if has_val else None
            # Without validation every epoch "improves": best/ is the last epoch.
            value = (
                _selection_value(metrics, config.selection, base_val) if metrics else float(epoch)
            )
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "validation": metrics,
                      "selection_value": value if has_val else None,
                      "seconds": seconds}  # fmt: skip
            state["history"].append(record)
            state["train_seconds"] += seconds
            improved = value > state["best_value"]
            if improved:
                state["best_value"], state["best_epoch"], state["bad_epochs"] = value, epoch, 0
                save_pretrained(chosen, out / "best")
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            if config.patience > 0 and state["bad_epochs"] >= config.patience:
                state["finished"] = True
            if epoch >= last_epoch:
                state["finished"] = True
            bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", val_ndcg=_fmt(metrics))
            extra = {} if ema is None else {"ema": ema.state_dict()}
            _save_last(out, model, {**state, "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), **extra})  # fmt: skip
            summary = _summary(state, data, base_val, out, resumed_from)
            _write_summary(out, summary)
            if callback is not None:
                callback(epoch, record)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    summary = _summary(state, data, base_val, out, resumed_from)
    _write_summary(out, summary)
    return summary


def _fmt(metrics: Mapping[str, Any] | None) -> str:
    return "-" if not metrics else f"{metrics['overall_nDCG@10']:.4f}"


def _summary(
    state: Mapping[str, Any],
    data: TrainingData,
    base_val: Mapping[str, float],
    out: Path,
    resumed_from: int | None,
) -> dict[str, Any]:
    history = list(state["history"])
    best = next((h for h in history if h["epoch"] == state["best_epoch"]), None)
    return {
        "checkpoint": str(out / "best"),
        "best_epoch": state["best_epoch"],
        "best_selection_value": state["best_value"] if data.val.ids else None,
        "best_validation": None if best is None else best["validation"],
        "base_validation": dict(base_val),
        "epochs_completed": state["epoch"],
        "finished": state["finished"],
        "history": history,
        "train_seconds": state["train_seconds"],
        "config": state["config"],
        "data": data.describe(),
        "resumed_from_epoch": resumed_from,
    }
