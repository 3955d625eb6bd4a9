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
