"""Tables in and out: torch state dicts and .safetensors files, checked against torch and the
reference safetensors implementation."""

from __future__ import annotations

import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import nnx

import jaxembed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
JAX_DTYPE = {
    torch.float32: jnp.float32,
    torch.float16: jnp.float16,
    torch.bfloat16: jnp.bfloat16,
    torch.float64: jnp.float64,
}


def _hf_state_dict(dtype):
    """A decoder checkpoint's shape of state dict: the token table is one entry among many."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 4, padding_idx=0).to(dtype)
    return emb, {
        "model.embed_tokens.weight": emb.weight.detach(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4).to(dtype),
        "model.norm.weight": torch.ones(4, dtype=dtype),
        "lm_head.weight": torch.randn(11, 4).to(dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_torch_keeps_values_and_dtype(dtype):
    emb, sd = _hf_state_dict(dtype)
    params = jaxembed.from_torch(sd, prefix="model.embed_tokens.")
    assert params["weight"].dtype == JAX_DTYPE[dtype]
    want = emb.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["weight"], np.float32), want)
    # the module over it looks up what torch's does
    idx = np.array([[1, 0, 10], [3, 3, 2]])
    mod = jaxembed.Embedding.from_pretrained(params["weight"], freeze=False, padding_idx=0)
    np.testing.assert_array_equal(
        np.asarray(mod(idx), np.float32), emb(torch.from_numpy(idx)).detach().float().numpy()
    )


def test_from_torch_embedding_bag_state_dict_and_round_trip():
    bag = torch.nn.EmbeddingBag(7, 3, mode="max")
    params = jaxembed.from_torch(bag.state_dict())
    back = torch.nn.EmbeddingBag(7, 3, mode="max")
    back.load_state_dict(jaxembed.to_torch(params))
    np.testing.assert_array_equal(back.weight.detach().numpy(), bag.weight.detach().numpy())
    idx = torch.tensor([[1, 2, 6], [0, 0, 5]])
    out, _ = jaxembed.embedding_bag(params, idx.numpy(), mode="max")
    np.testing.assert_array_equal(out, bag(idx).detach().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_to_torch_keeps_dtype_and_prefix(dtype):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), JAX_DTYPE[dtype])
    sd = jaxembed.to_torch({"weight": w}, prefix="encoder.tok.")
    assert list(sd) == ["encoder.tok.weight"] and sd["encoder.tok.weight"].dtype == dtype
    emb = torch.nn.Embedding(5, 3).to(dtype)
    emb.load_state_dict({"weight": sd["encoder.tok.weight"]})
    np.testing.assert_array_equal(emb.weight.detach().float().numpy(), np.asarray(w, np.float32))
    # the tensor owns its memory: changing it leaves the JAX array alone
    sd["encoder.tok.weight"].zero_()
    assert np.asarray(w, np.float32).any()


def test_float64_table_without_x64_is_not_rounded_silently():
    sd = {"weight": torch.randn(3, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="jax_enable_x64"):
        jaxembed.from_torch(sd)
    params = jaxembed.from_torch(sd, dtype=jnp.float32)
    np.testing.assert_array_equal(params["weight"], sd["weight"].float().numpy())


def test_missing_key_names_the_tables_present():
    _, sd = _hf_state_dict(torch.float32)
    with pytest.raises(KeyError, match=r"model\.embed_tokens\.weight"):
        jaxembed.from_torch(sd)
    with pytest.raises(TypeError, match="prefix"):
        jaxembed.from_torch(sd, prefix=3)
    with pytest.raises(ValueError, match="2-D"):
        jaxembed.from_torch(sd, name="model.norm.weight")
    with pytest.raises(TypeError, match="state_dict"):
        jaxembed.from_torch([("weight", 1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reads_safetensors_written_by_the_reference(tmp_path, dtype):
    emb, sd = _hf_state_dict(dtype)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    names = jaxembed.safetensors_names(path)
    assert names["model.embed_tokens.weight"][1] == (11, 4)
    params = jaxembed.load_safetensors(path, prefix="model.embed_tokens.")
    assert params["weight"].dtype == JAX_DTYPE[dtype]
    np.testing.assert_array_equal(
        np.asarray(params["weight"], np.float32), emb.weight.detach().float().numpy()
    )
    lm_head = jaxembed.load_safetensors(path, name="lm_head.weight", dtype=jnp.float32)
    np.testing.assert_array_equal(lm_head["weight"], sd["lm_head.weight"].float().numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=str)
def test_writes_safetensors_the_reference_reads(tmp_path, dtype):
    w = np.random.default_rng(1).normal(size=(6, 5)).astype(dtype)
    path = tmp_path / "emb.safetensors"
    jaxembed.save_safetensors(
        path, {"weight": jnp.asarray(w)}, prefix="model.embed_tokens.", metadata={"format": "pt"}
    )
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        got = f.get_tensor("model.embed_tokens.weight")
    np.testing.assert_array_equal(got.view(np.uint8), w.view(np.uint8))  # bit for bit
    back = jaxembed.load_safetensors(path, prefix="model.embed_tokens.")
    np.testing.assert_array_equal(np.asarray(back["weight"]).view(np.uint8), w.view(np.uint8))


def test_bad_safetensors_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors"):
        jaxembed.load_safetensors(bad)
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="not a safetensors"):
        jaxembed.load_safetensors(bad)
    ints = tmp_path / "ints.safetensors"
    safetensors.numpy.save_file({"weight": np.arange(6, dtype=np.int64).reshape(2, 3)}, str(ints))
    with pytest.raises(TypeError, match="I64"):
        jaxembed.load_safetensors(ints)
    # truncated data
    good = tmp_path / "good.safetensors"
    jaxembed.save_safetensors(good, {"weight": jnp.ones((4, 4))})
    good.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        jaxembed.load_safetensors(good)
    with pytest.raises(KeyError, match="weight"):
        jaxembed.load_safetensors(good, prefix="model.")


def test_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "emb.safetensors"
    jaxembed.save_safetensors(path, {"weight": jnp.ones((2, 2))})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        jaxembed.save_safetensors(path, {"weight": jnp.ones((2, 2), jnp.int32)})
    assert path.read_bytes() == before
    header_len = struct.unpack("<Q", before[:8])[0]
    assert (8 + header_len) % 8 == 0 and json.loads(before[8 : 8 + header_len])


def test_nnx_module_from_a_checkpoint_table():
    _, sd = _hf_state_dict(torch.float32)
    params = jaxembed.from_torch(sd, prefix="model.embed_tokens.")
    mod = jaxembed.Embedding.from_pretrained(params["weight"], freeze=False, sparse=True)
    assert isinstance(mod.weight, jaxembed.sparse.SparseParam)
    assert isinstance(mod.weight, nnx.Param)


def test_named_arrays_of_every_dtype_round_trip_with_the_reference(tmp_path):
    """``write_arrays`` / ``read_arrays`` (a serving artifact's tables: packed uint8 rows, ids,
    flags) against the ``safetensors`` package, both ways, big-endian input included."""
    from safetensors.numpy import load_file, save_file

    from jaxembed import _interop

    rng = np.random.default_rng(0)
    arrays = {
        "rows/0": rng.integers(0, 256, (5, 12)).astype(np.uint8),
        "ids": rng.integers(-(2**40), 2**40, 7).astype(np.int64),
        "small": rng.integers(-100, 100, 3).astype(np.int8),
        "flags": rng.random(4) < 0.5,
        "scale": rng.normal(size=(2, 3)).astype(">f4"),
        "half": rng.normal(size=3).astype(np.float16),
        "counts": rng.integers(0, 2**31, 2).astype(np.int32),
    }
    ours = tmp_path / "ours.safetensors"
    _interop.write_arrays(ours, arrays)
    theirs = load_file(ours)
    for name, array in arrays.items():
        assert theirs[name].dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(theirs[name], array)
    reference = tmp_path / "reference.safetensors"
    save_file({k: np.ascontiguousarray(v, v.dtype.newbyteorder("=")) for k, v in arrays.items()},
              reference)  # fmt: skip
    back = _interop.read_arrays(reference)
    assert back.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(back[name], array)
    with pytest.raises(TypeError, match="'bad'"):
        _interop.write_arrays(tmp_path / "bad.safetensors", {"bad": np.array(["text"])})
