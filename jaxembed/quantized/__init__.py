"""Quantized tables: row-wise 8-, 4- and 2-bit tables in torch's and FBGEMM's byte layout.

What this folder owns, module by module:

* ``_format``: :class:`QuantizedTable`, :func:`quantize` and :func:`dequantize`, byte for byte
  torch's ``embedding_bag_{byte,4bit,2bit}_prepack`` rows; the row decoding a lookup uses (the
  table is a :class:`~jaxembed.core._packed.PackedTable`, which the core's gather reads); and
  :func:`from_torch`, the rows of torch's quantized modules; :func:`from_tbe` and
  :func:`from_torchrec`, FBGEMM's TBE rows under TorchRec's quantized collections.

It may import :mod:`jaxembed.core`.
"""

from jaxembed.quantized._format import (
    QuantizedTable,
    dequantize,
    from_tbe,
    from_torch,
    from_torchrec,
    quantize,
)

__all__ = [
    "QuantizedTable",
    "dequantize",
    "from_tbe",
    "from_torch",
    "from_torchrec",
    "quantize",
]
