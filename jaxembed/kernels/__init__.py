"""jaxembed's CPU kernels: fused C++ bag, gather and row-wise update kernels behind the XLA FFI.

On CPU, XLA runs a gather, a scatter or a loop over bags on one core, without SIMD gathers or
prefetch. These kernels are what the core's pipeline calls there instead: where XLA's CPU
gathers and scatters would run (``jaxembed.core._bag``'s bag reduction, ``_index_policy``'s row
gather, ``jaxembed.sparse``'s row-wise optimizers), each under ``jax.lax.platform_dependent``,
so GPU and TPU programs, and any CPU without the built kernels, run the pure-JAX path, which
stays the reference the kernels are tested against.

* :func:`available`: whether this process runs them (built, and not turned off);
* :func:`status`: which instruction set they run with, or why they do not run;
* :func:`pure_jax`: a block traced on the pure-JAX path (what an exported artifact holds).

``JAXEMBED_KERNELS=0`` in the environment, before jaxembed is imported, runs the pure-JAX path
everywhere; ``JAXEMBED_KERNEL_ISA=generic`` or ``avx2`` picks a lower instruction set than the
CPU offers (for testing each build on one machine).

What this folder owns, module by module:

* ``_native``: the compiled module (``csrc/``), which hands the FFI handlers to jax;
* ``_ffi``: their registration and one ``jax.ffi.ffi_call`` wrapper per kernel, with the
  checks of what each takes.

It may import nothing of jaxembed: the core imports it.

Example:
  >>> import jaxembed
  >>> isinstance(jaxembed.kernels.available(), bool)
  True
"""

from jaxembed.kernels._ffi import available, pure_jax, status

__all__ = ["available", "pure_jax", "status"]
