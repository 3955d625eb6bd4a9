"""``jaxembed-bench``: how close each embedding path runs to the device's memory bandwidth.

The command is :func:`main` (``jaxembed-bench --help``, or ``python -m jaxembed.bench``). Its
parts, a module each:

* ``_cases``: the ops, and each op's implementations (:func:`sparse_train_step`, ...);
* ``_baselines``: torch's and FBGEMM's implementations, run in the same process;
* ``_ids``: uniform and Zipf ids (:func:`make_ids`);
* ``_timing``: compiled once, warmed up, timed in interleaved rounds;
* ``_roofline``: each op's theoretical bytes (:func:`op_bytes`) and the measured copy
  bandwidth (:func:`copy_bandwidth`) they are set against;
* ``_run``: one configuration, every op and implementation (:func:`run`);
* ``_report``, ``_plot``: the table, the JSON document and the PNG;
* ``_allocator``: the rerun under glibc and tcmalloc (``--allocator``);
* ``_cli``: the command line.
"""

from jaxembed.bench._cases import (
    DTYPES,
    FLOOR,
    OPS,
    dense_train_step,
    floor_step,
    sparse_bag_train_step,
    sparse_train_step,
    train_loss,
)
from jaxembed.bench._cli import main
from jaxembed.bench._ids import make_ids, parse_ids
from jaxembed.bench._roofline import bandwidth, copy_bandwidth, op_bytes
from jaxembed.bench._run import kernels_path, run

__all__ = [
    "DTYPES",
    "FLOOR",
    "OPS",
    "bandwidth",
    "copy_bandwidth",
    "dense_train_step",
    "floor_step",
    "kernels_path",
    "main",
    "make_ids",
    "op_bytes",
    "parse_ids",
    "run",
    "sparse_bag_train_step",
    "sparse_train_step",
    "train_loss",
]
