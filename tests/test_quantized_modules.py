"""Frozen quantized nnx modules: from_quantized, quantize(), torch's quantized modules, the tied
head, and a checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch.ao.quantization import (
    float_qparams_weight_only_qconfig,
    float_qparams_weight_only_qconfig_4bit,
)

import jaxembed

EPS = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("bits", [8, 4, 2, "e4m3"])
def test_quantize_a_trained_module_and_look_up_as_the_functions_do(bits, rng):
    fp8 = bits if isinstance(bits, str) else None
    bits = 8 if fp8 else bits
    emb = jaxembed.Embedding(40, 16, padding_idx=3, rngs=nnx.Rngs(0))
    bag = jaxembed.EmbeddingBag(40, 16, mode="max", include_last_offset=True, rngs=nnx.Rngs(1))
    qe, qb = emb.quantize(bits, fp8=fp8), bag.quantize(bits, fp8=fp8)
    assert (
        isinstance(qe.weight, jaxembed.QuantizedWeight) and qe.weight.get_value().dtype == jnp.uint8
    )
    assert (qe.bits, qe.fp8, qe.padding_idx) == (bits, fp8, 3)
    assert (qb.mode, qb.include_last_offset) == ("max", True)
    assert not nnx.state(qe, nnx.Param)  # frozen: nothing an optimizer or nnx.grad sees
    q = jaxembed.quantize(emb.weight.get_value(), bits=bits, fp8=fp8)
    np.testing.assert_array_equal(np.asarray(qe.weight.get_value()), np.asarray(q.data))
    ids = jnp.asarray(rng.integers(0, 40, (6, 5)))
    np.testing.assert_array_equal(
        np.asarray(nnx.jit(lambda m, i: m(i))(qe, ids)), np.asarray(jaxembed.embedding(q, ids)[0])
    )
    flat, offsets = ids.reshape(-1), jnp.arange(7) * 5
    qbag = jaxembed.quantize(bag.weight.get_value(), bits=bits, fp8=fp8)
    ref = jaxembed.embedding_bag(qbag, flat, offsets, mode="max", include_last_offset=True)[0]
    np.testing.assert_array_equal(np.asarray(qb(flat, offsets)), np.asarray(ref))
    # the tied head: scores against the table the lookups return
    query = jnp.asarray(rng.normal(size=(3, 16)).astype(np.float32))
    np.testing.assert_allclose(
        np.asarray(qe.attend(query)),
        np.asarray(query @ jaxembed.dequantize(q)["weight"].T),
        rtol=1e-6,
        atol=1e-6,
    )


def test_from_quantized_output_dtype_and_no_retrace(rng):
    q = jaxembed.quantize(jnp.asarray(rng.normal(size=(30, 8)).astype(np.float32)), bits=4)
    bag = jaxembed.EmbeddingBag.from_quantized(q, mode="sum", dtype=jnp.bfloat16, padding_idx=0)
    traces = []

    @nnx.jit
    def call(m, ids):
        traces.append(1)
        return m(ids)

    for seed in range(3):
        ids = jax.random.randint(jax.random.key(seed), (4, 6), 0, 30)
        out = call(bag, ids)
        ref = jaxembed.embedding_bag(q, ids, mode="sum", padding_idx=0)[0].astype(jnp.bfloat16)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "qconfig,bits",
    [(float_qparams_weight_only_qconfig, 8), (float_qparams_weight_only_qconfig_4bit, 4)],
)
def test_torchs_quantized_embedding_bag_reads_in_and_matches(qconfig, bits, rng):
    torch.manual_seed(bits)
    float_bag = torch.nn.EmbeddingBag(100, 16, mode="sum")
    float_bag.qconfig = qconfig
    tq = torch.ao.nn.quantized.EmbeddingBag.from_float(float_bag)
    q = jaxembed.quantized.from_torch(tq)
    assert (q.bits, q.shape) == (bits, (100, 16))
    ours = jaxembed.EmbeddingBag.from_quantized(q, mode="sum")
    ids = rng.integers(0, 100, 300)
    offsets = np.sort(rng.integers(0, 300, 40))
    offsets[0] = 0
    ref = tq(torch.from_numpy(ids), torch.from_numpy(offsets)).numpy()
    out = np.asarray(ours(ids, offsets))
    if bits == 4:  # torch's own rows, decoded exactly: bit for bit
        np.testing.assert_array_equal(out, ref)
    else:  # torch's kernel rounds each decode once (an FMA), jaxembed may round twice
        counts = np.diff(np.append(offsets, 300))
        bound = 2 * (counts + 1) * EPS * np.abs(float_bag.weight.detach().numpy()).max() * counts
        assert np.all(np.abs(out - ref) <= bound[:, None] + 1e-6)
    # torch's quantized nn.Embedding (8-bit) too
    float_emb = torch.nn.Embedding(100, 16)
    float_emb.qconfig = float_qparams_weight_only_qconfig
    te = torch.ao.nn.quantized.Embedding.from_float(float_emb)
    emb = jaxembed.Embedding.from_quantized(jaxembed.quantized.from_torch(te))
    ids2 = rng.integers(0, 100, (5, 7))
    ref = te(torch.from_numpy(ids2)).numpy()
    np.testing.assert_allclose(np.asarray(emb(ids2)), ref, rtol=0, atol=4 * EPS * np.abs(ref).max())


def test_checkpoint_round_trip(tmp_path, rng):
    q = jaxembed.quantize(jnp.asarray(rng.normal(size=(50, 8)).astype(np.float32)), bits=2)
    bag = jaxembed.EmbeddingBag.from_quantized(q, mode="mean")
    graphdef, state = nnx.split(bag)
    path = tmp_path / "bag.npz"
    np.savez(path, **{"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(state)})
    loaded = dict(np.load(path))
    flat = [(tuple(k.split("/")), jnp.asarray(v)) for k, v in loaded.items()]
    fresh = nnx.eval_shape(lambda: jaxembed.EmbeddingBag.from_quantized(q, mode="mean"))
    _, abstract = nnx.split(fresh)
    restored_state = nnx.from_flat_state(
        [(k, abstract_v.replace(v)) for (k, v), (_, abstract_v) in
         zip(sorted(flat), sorted(nnx.to_flat_state(abstract)), strict=True)]
    )  # fmt: skip
    restored = nnx.merge(graphdef, restored_state)
    ids = rng.integers(0, 50, (4, 3))
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(bag(ids)))
    assert restored.weight.get_value().dtype == jnp.uint8 and restored.bits == 2


def test_bad_quantized_modules_are_refused(rng):
    w = jnp.asarray(rng.normal(size=(10, 8)).astype(np.float32))
    with pytest.raises(TypeError, match="QuantizedTable"):
        jaxembed.Embedding.from_quantized(w)
    q = jaxembed.quantize(w)
    with pytest.raises(ValueError, match="output_dtype must be"):
        jaxembed.Embedding.from_quantized(q, dtype=jnp.int32)
    with pytest.raises(ValueError, match="renorm the table first"):
        jaxembed.Embedding(10, 8, max_norm=1.0, rngs=nnx.Rngs(0)).quantize()
    with pytest.raises(ValueError, match="already quantized"):
        jaxembed.Embedding.from_quantized(q).quantize()
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2"):
        jaxembed.EmbeddingBag(10, 8, rngs=nnx.Rngs(0)).quantize(3)
    with pytest.raises(TypeError, match="quantized"):
        jaxembed.quantized.from_torch(torch.nn.Embedding(3, 2))
    # Flax's drop-in reads its float table its own way: it refuses, never casts the bytes
    with pytest.raises(TypeError, match="Embed is not built over quantized tables"):
        jaxembed.Embed(10, 8, rngs=nnx.Rngs(0)).quantize()
    with pytest.raises(TypeError, match="Embed is not built over quantized tables"):
        jaxembed.Embed.from_quantized(q)
