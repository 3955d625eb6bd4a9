"""One process of the 2-process test (tests/test_multihost.py): 4 fake CPU devices each, joined by
``jax.distributed.initialize`` over gloo. Usage: ``worker.py PROCESS_ID PORT OUT.npz``.

Each process builds the global batch from one seed, feeds its own devices' blocks
(``jax.sharding.put_features`` over ``make_array_from_process_local_data``), and the two train
a sharded collection 3 sparse steps; both save it with jaxembed.checkpoint.save_tables and restore
it onto another plan; process 0 writes the tables, trained and restored. With ``2d``, the mesh is
``replica x x`` (2 x 4), a replica a process: the ids move inside a process, and only the
owners' sparse updates (and the refusal's count, a data-parallel table's sums) cross processes.
"""

import os
import sys


def main(process_id: int, port: str, out: str, two_d: bool) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    import numpy as np

    import jaxembed
    from jaxembed import sharding as S

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from case import B_LOCAL, K, batch, cotangents, placements, tables

    assert jax.device_count() == K and jax.local_device_count() == K // 2
    if two_d:  # replica r: process r's 4 devices
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        mesh = jax.sharding.Mesh(np.array(devices).reshape(2, K // 2), ("replica", "x"))
        plan = S.by_hand(tables(), mesh, placements(True), axis="x", replica="replica")
    else:
        mesh = jax.make_mesh((K,), ("x",))
        plan = S.by_hand(tables(), mesh, placements())
    if process_id == 0:
        print(plan, flush=True)
    _, blocks = batch()
    # this process's devices, in the mesh's order: their blocks are its own data
    mine = [i for i, d in enumerate(mesh.devices.reshape(-1)) if d.process_index == process_id]
    features = S.put_features([blocks[i] for i in mine], plan)
    # the routed groups at the capacity this batch needs: a stats pass over both processes
    plan = plan.with_capacity(S.capacity_for(plan, [features], slack=1.0))
    if process_id == 0:
        print("capacity", dict(plan.capacity), flush=True)
    params = S.init(jax.random.key(0), plan)
    opt = S.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), plan)
    cot = cotangents()

    @jax.jit
    def step(p, st, features):
        _, lk = S.lookup(p, features, plan)
        return opt.update(lk.grad(cot), st, lk.params)

    with jax.set_mesh(mesh):
        state = opt.init(params)
        # what the lookup and its gradient move, read off the compiled programs, is what the
        # plan states (on 2d, the replica axis's collectives are the ones between the processes)
        weights = tuple(params[g.name]["weight"] for g in plan.groups)
        mapped = S._collection
        look = mapped._collection.lower(weights, features, plan=plan, sparse=True)
        _, lk = S.lookup(params, features, plan)
        grad = mapped._grads.lower(cot, lk.pieces, plan=plan, keys=features.keys)
        moved = {part: S.collective_bytes(hlo.compile().as_text())
                 for part, hlo in (("lookup", look), ("grad", grad))}  # fmt: skip
        assert moved == S.step_bytes(plan, features), (moved, S.step_bytes(plan, features))
        if process_id == 0:
            print("bytes as the plan states", moved, flush=True)
        for _ in range(3):
            params, state = step(params, state, features)
        result = S.tables_of(params, plan)
    # both processes save the collection table by table, each writing its own devices' blocks
    # to one file, then restore it onto every table row-wise, each reading its own blocks
    folder = os.path.join(os.path.dirname(out), "ckpt")
    saved = jaxembed.checkpoint.save_tables(folder, 3, params, plan, state=state)
    other = S.by_hand(tables(), mesh, {t.name: S.row_wise() for t in tables()}, axis="x",
                      replica=plan.replica)  # fmt: skip
    with jax.set_mesh(mesh):
        back, _ = jaxembed.checkpoint.restore_tables(
            folder, other, tx=jaxembed.sparse.rowwise_adagrad(0.1)
        )
        restored = S.tables_of(back, other)
    if process_id == 0:
        print("saved", saved.kind, saved.path.name, flush=True)
        np.savez(out, **result, **{f"restored/{k}": v for k, v in restored.items()})
    print(f"process {process_id}: done, {B_LOCAL * K} samples", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:] == ["2d"])
