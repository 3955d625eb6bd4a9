#!/usr/bin/env bash
# The kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds csrc/ with both into
# a temporary folder and runs tests/test_kernels.py against that build (JAXEMBED_KERNELS_LIBRARY),
# so a read or write outside any buffer, or undefined behaviour, aborts the run. .ci/run runs it;
# by hand, from the repository root with jaxembed installed:
#
#   bash csrc/check_sanitizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
include=$("$python" -c "import jax.ffi; print(jax.ffi.include_dir())")
cmake -S csrc -B "$build" -DCMAKE_BUILD_TYPE=Debug -DJAXEMBED_SANITIZE=ON \
  "-DPython_EXECUTABLE=$(command -v "$python")" "-DJAXEMBED_FFI_INCLUDE=$include" > "$build/log" \
  || { cat "$build/log"; exit 1; }
cmake --build "$build" --parallel >> "$build/log" 2>&1 || { cat "$build/log"; exit 1; }
cxx=$(grep -m1 '^CMAKE_CXX_COMPILER:' "$build/CMakeCache.txt" | cut -d= -f2)
# Python itself is not sanitized: the runtimes are preloaded, and its own leaks are not reported
export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export JAXEMBED_KERNELS_LIBRARY=$(ls "$build"/_native*.so)
"$python" -c "import os, jaxembed.kernels._ffi as f
assert f._native.__file__ == os.environ['JAXEMBED_KERNELS_LIBRARY'], f._native.__file__"
# every kernel test, the slow one too (each instruction set's build below the best one)
"$python" -m pytest -p no:cacheprovider -n 0 -m "slow or not slow" tests/test_kernels.py "$@"
