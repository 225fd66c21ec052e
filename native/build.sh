#!/usr/bin/env bash
# Builds nativelm's ONNX Runtime operator library (docs/kernels.md) with Debian's gcc:
#   native/build/<triple>/libnativelm_ops.so   the library (RegisterCustomOps, nativelm_ops_kernel)
#   native/build/<triple>/kernel_check         a driver that checks every kernel against the portable one
#   native/build/<triple>/read_bandwidth       the bandwidth roofline of bench/ternary_kernels.py (host only)
# Usage: native/build.sh [aarch64]    (aarch64: cross-compiled with aarch64-linux-gnu-gcc)
# Set CC to use another compiler. Each file is written next to its place and renamed into it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target="${1:-host}"
case "$target" in
  host) cc="${CC:-gcc}" ;;
  aarch64) cc="${CC:-aarch64-linux-gnu-gcc}" ;;
  *) echo "native/build.sh: unknown target '$target' (host or aarch64)" >&2; exit 2 ;;
esac
if ! command -v "$cc" >/dev/null 2>&1; then
  echo "native/build.sh: no C compiler '$cc' (Debian: apt-get install gcc libc6-dev, or gcc-aarch64-linux-gnu)" >&2
  exit 3
fi
triple="$("$cc" -dumpmachine)"
out="$here/build/$triple"
mkdir -p "$out"
src="$here/src"
common=(-std=gnu11 -O3 -fPIC -Wall -Wextra -Werror -ffp-contract=off -I"$here/include" -I"$src")
kernels=("$src/prepare.c" "$src/kernels_portable.c" "$src/dispatch.c" "$src/kernels_x86.c" "$src/kernels_arm.c")
ops=("$src/ort_glue.c" "$src/op_define.c" "$src/op_matmul.c" "$src/op_moe.c" "$src/register.c")

"$cc" "${common[@]}" -shared -fvisibility=hidden -pthread -o "$out/.libnativelm_ops.so.tmp" "${kernels[@]}" "${ops[@]}" -lm
mv -f "$out/.libnativelm_ops.so.tmp" "$out/libnativelm_ops.so"
"$cc" "${common[@]}" -o "$out/.kernel_check.tmp" "$here/tests/kernel_check.c" "${kernels[@]}" -lm
mv -f "$out/.kernel_check.tmp" "$out/kernel_check"
# the roofline read loop of bench/ternary_kernels.py: host only (tuned for the build machine's CPU)
if [ "$target" = host ]; then
  "$cc" -std=gnu11 -O3 -march=native -Wall -Wextra -Werror -pthread -o "$out/.read_bandwidth.tmp" "$here/bench/read_bandwidth.c"
  mv -f "$out/.read_bandwidth.tmp" "$out/read_bandwidth"
fi
echo "native/build.sh: built $out/libnativelm_ops.so"
