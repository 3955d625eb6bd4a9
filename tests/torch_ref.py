"""torch as the oracle: what ``F.embedding`` returns, leaves in the table, and puts in ``.grad``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class TorchEmbedding(NamedTuple):
    out: np.ndarray
    table: np.ndarray  # the weight after the call (renormed in place with max_norm)
    grad: np.ndarray  # weight.grad for loss = sum(out * cotangent)


def torch_embedding(
    weight: np.ndarray,
    indices: np.ndarray,
    cotangent: np.ndarray | None = None,
    *,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
) -> TorchEmbedding:
    w = torch.tensor(np.array(weight), requires_grad=True)
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    out = F.embedding(
        idx,
        w,
        padding_idx=padding_idx,
        max_norm=max_norm,
        norm_type=norm_type,
        scale_grad_by_freq=scale_grad_by_freq,
    )
    if cotangent is None:
        cotangent = np.ones(out.shape, dtype=weight.dtype)
    (out * torch.from_numpy(np.asarray(cotangent))).sum().backward()
    grad = w.grad if w.grad is not None else torch.zeros_like(w)
    return TorchEmbedding(out.detach().numpy(), w.detach().numpy(), grad.numpy())


class TorchBag(NamedTuple):
    out: np.ndarray
    table: np.ndarray
    grad: np.ndarray
    psw_grad: np.ndarray | None


def torch_embedding_bag(
    weight, indices, offsets, cotangent, *, per_sample_weights=None, composed=False, **kw
) -> TorchBag:
    """torch's ``F.embedding_bag``; or, with ``composed=True``, its documented semantics built
    from ``F.embedding`` and a per-bag reduction (the oracle where torch's bag kernel is wrong:
    ``scale_grad_by_freq``)."""
    w = torch.tensor(np.array(weight), requires_grad=True)
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    off = None if offsets is None else torch.from_numpy(np.asarray(offsets, dtype=np.int64))
    psw = None
    if per_sample_weights is not None:
        psw = torch.tensor(np.array(per_sample_weights), requires_grad=True)
    if composed:
        out = _composed_bag(w, idx, off, psw, **kw)
    else:
        out = F.embedding_bag(idx, w, off, per_sample_weights=psw, **kw)
    if out.requires_grad:  # zero bags: nothing to differentiate
        (out * torch.from_numpy(np.asarray(cotangent))).sum().backward()
    grad = w.grad if w.grad is not None else torch.zeros_like(w)
    return TorchBag(
        out.detach().numpy(),
        w.detach().numpy(),
        grad.numpy(),
        None
        if psw is None
        else (psw.grad if psw.grad is not None else torch.zeros_like(psw)).numpy(),
    )


def _composed_bag(w, idx, off, psw, *, mode, padding_idx=None, include_last_offset=False, **kw):
    rows = F.embedding(idx, w, padding_idx=padding_idx, **kw)
    if idx.dim() == 2:
        groups = [(rows[b], idx[b], None if psw is None else psw[b]) for b in range(idx.shape[0])]
    else:
        starts = off[:-1] if include_last_offset else off
        ends = list(starts[1:].tolist()) + [idx.shape[0]]
        groups = [
            (rows[s:e], idx[s:e], None if psw is None else psw[s:e])
            for s, e in zip(starts.tolist(), ends, strict=True)
        ]
    out = []
    for r, i, p in groups:
        keep = (
            torch.ones(len(i), dtype=torch.bool)
            if padding_idx is None
            else i != padding_idx % w.shape[0]
        )
        r = r[keep]
        if p is not None:
            r = r * p[keep][:, None]
        if len(r) == 0:
            out.append(torch.zeros(w.shape[1], dtype=w.dtype))
        elif mode == "sum":
            out.append(r.sum(0))
        elif mode == "mean":
            out.append(r.mean(0))
        else:
            out.append(r.max(0).values)
    return torch.stack(out) if out else torch.zeros((0, w.shape[1]), dtype=w.dtype)


def torchrec_bag_configs(tables) -> list:
    """TorchRec's ``EmbeddingBagConfig`` of each jaxembed bag table (name, shape, features,
    pooling): the oracle collections are built from these."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    return [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=list(t.feature_names),
            pooling=PoolingType[t.pooling.upper()],
        )
        for t in tables
    ]
