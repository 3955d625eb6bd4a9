"""Quantized tables: row-wise 8-, 4- and 2-bit tables in torch's and FBGEMM's byte layout.

What this folder owns, module by module:

* ``_format``: :class:`QuantizedTable`, :func:`quantize` and :func:`dequantize`, byte for byte
  torch's ``embedding_bag_{byte,4bit,2bit}_prepack`` rows, and the row unpacking a lookup uses.

It may import :mod:`jaxembed.core`.
"""

from jaxembed.quantized._format import QuantizedTable, dequantize, quantize

__all__ = ["QuantizedTable", "dequantize", "quantize"]
