"""The same-process baselines of ``jaxembed-bench``: torch, and FBGEMM's table-batched embedding.

Each is optional. A baseline whose package is missing is left out of the run, and the run says
which and why (``pip install 'jaxembed[bench-baselines]'`` brings FBGEMM's CPU build).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


class TorchCase:
    """A torch (or FBGEMM) implementation of an op: no compile step; ``sync`` waits on CUDA."""

    def __init__(self, fn: Callable, sync: Callable | None):
        self.fn, self.sync = fn, sync

    def compile_ms(self) -> float:
        return 0.0

    def __call__(self):
        out = self.fn()
        if self.sync is not None:
            self.sync()
        return out


def cases(
    op: str,
    table_np: np.ndarray,
    ids_np: np.ndarray,
    bags_np: np.ndarray,
    cot_np: np.ndarray,
    bag_target_np: np.ndarray,
    device: str,
    lr: float,
) -> tuple[dict[str, TorchCase], dict[str, str]]:
    """``(cases, missing)``: the baselines of ``op``, and ``{name: why}`` for those left out."""
    found: dict[str, TorchCase] = {}
    missing: dict[str, str] = {}
    try:
        import torch
    except ImportError:
        return found, {"torch": "torch is not installed"}
    if table_np.dtype != np.float32:
        return found, {"torch": "the baselines run float32 tables only"}
    # torch's sparse optimizers build COO tensors unchecked and say so on every step
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    found.update(_torch(op, torch, table_np, ids_np, bags_np, cot_np, bag_target_np, device, lr))
    if op == "remap":
        try:
            found["torchrec MCH"] = _torchrec_remap(torch, table_np.shape[0], ids_np)
        except ImportError:
            missing["torchrec MCH"] = "torchrec is not installed (pip install --no-deps torchrec)"
    if op in FBGEMM_OPS:
        if device != "cpu":
            missing["fbgemm TBE"] = "only FBGEMM's CPU build is wired in"
        else:
            try:
                case = _fbgemm(op, torch, table_np, ids_np, bags_np, cot_np, bag_target_np, lr)
            except ImportError:
                missing["fbgemm TBE"] = (
                    "fbgemm_gpu is not installed (pip install 'jaxembed[bench-baselines]')"
                )
            else:
                found["fbgemm TBE"] = case
    return found, missing


def _torch(op, torch, table_np, ids_np, bags_np, cot_np, bag_target_np, device, lr):
    import torch.nn.functional as F

    sync = torch.cuda.synchronize if device == "cuda" else None
    w = torch.from_numpy(table_np.copy()).to(device)
    ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)
    bags = torch.from_numpy(bags_np.astype(np.int64)).to(device)
    if op == "lookup":
        return {"torch": TorchCase(lambda: F.embedding(ids, w), sync)}
    if op == "lookup+max_norm":
        return {"torch": TorchCase(lambda: F.embedding(ids, w, max_norm=1.0), sync)}
    if op == "grad":
        wg = w.clone().requires_grad_()
        cot = torch.from_numpy(cot_np).to(device)

        def grad():
            wg.grad = None
            (F.embedding(ids, wg) * cot).sum().backward()
            return wg.grad

        return {"torch": TorchCase(grad, sync)}
    if op.startswith("bag-"):
        mode = op.removeprefix("bag-")
        return {"torch": TorchCase(lambda: F.embedding_bag(bags, w, mode=mode), sync)}
    torch_opt = {"sgd": "SGD", "adagrad": "Adagrad", "lazy_adam": "SparseAdam"}
    name = op.removeprefix("train-sparse-")
    if op == "train-dense":
        emb, make = torch.nn.Embedding.from_pretrained(w, freeze=False), torch.optim.Adam
    elif op.startswith("train-sparse-") and name in torch_opt:
        emb = torch.nn.Embedding.from_pretrained(w, freeze=False, sparse=True)
        make = getattr(torch.optim, torch_opt[name])
    else:
        return {}
    opt = make(emb.parameters(), lr=lr)
    target = torch.from_numpy(cot_np).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        (0.5 * ((emb(ids) - target) ** 2).mean()).backward()
        opt.step()

    return {"torch": TorchCase(step, sync)}


# the ops FBGEMM's fused row-wise Adagrad runs: unpooled rows, and bags summed (pooled)
FBGEMM_OPS = ("train-sparse-rowwise_adagrad", "train-bag-rowwise_adagrad")


def fbgemm_rowwise_adagrad(torch, table_np: np.ndarray, lr: float, *, pooled: bool):
    """FBGEMM's CPU table-batched embedding over a copy of ``table_np``, with its fused
    EXACT_ROWWISE_ADAGRAD (the optimizer runs inside the backward pass), sum-pooled or not."""
    with warnings.catch_warnings():  # its CPU build warns of the GPU-only kernels it lacks
        warnings.simplefilter("ignore", DeprecationWarning)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

    V, D = table_np.shape
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        [(V, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=1e-8,  # jaxembed.sparse.rowwise_adagrad's default
        pooling_mode=PoolingMode.SUM if pooled else PoolingMode.NONE,
        weights_precision=SparseType.FP32,
    )
    with torch.no_grad():
        emb.split_embedding_weights()[0].copy_(torch.from_numpy(table_np.copy()))
    return emb


def _fbgemm(op, torch, table_np, ids_np, bags_np, cot_np, bag_target_np, lr):
    """FBGEMM's fused row-wise Adagrad step (:func:`fbgemm_rowwise_adagrad`) on the op's ids."""
    pooled = op == "train-bag-rowwise_adagrad"
    emb = fbgemm_rowwise_adagrad(torch, table_np, lr, pooled=pooled)
    if pooled:
        indices = torch.from_numpy(bags_np.reshape(-1).astype(np.int64))
        offsets = torch.arange(0, indices.numel() + 1, bags_np.shape[1], dtype=torch.int64)
        target = torch.from_numpy(bag_target_np)
    else:
        indices = torch.from_numpy(ids_np.astype(np.int64))
        offsets = torch.arange(0, indices.numel() + 1, dtype=torch.int64)
        target = torch.from_numpy(cot_np)

    def step():
        out = emb(indices, offsets)
        (0.5 * ((out - target) ** 2).mean()).backward()

    return TorchCase(step, None)


def _torchrec_remap(torch, num_slots: int, ids_np: np.ndarray) -> TorchCase:
    """TorchRec's ``MCHManagedCollisionModule`` remap in eval mode, over the same full table of
    hashed ids as the ``remap`` op's (:func:`jaxembed.bench._cases.remap_state`)."""
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from jaxembed.bench._cases import hashed_ids, remap_state
    from jaxembed.collisions import to_torchrec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MCHManagedCollisionModule(
            zch_size=num_slots, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(),
            eviction_interval=1,
        )  # fmt: skip
    mc, state = remap_state(num_slots, ids_np.shape[0])
    module.load_state_dict({k: torch.from_numpy(v) for k, v in to_torchrec(mc, state).items()})
    module.eval()
    values = torch.from_numpy(hashed_ids(ids_np.astype(np.int64)))
    features = {"f": JaggedTensor(values=values, lengths=torch.tensor([values.numel()]))}
    return TorchCase(lambda: module(features)["f"].values(), None)
