#!/usr/bin/env bash
# GPU benchmark in one command: bash benchmarks/gpu.sh OUTDIR [extra gpu_bench.py options]
#
# Writes into OUTDIR (or $OUT): nvidia-smi.txt, gpu_bench.json (every measurement, errors included),
# gpu_bench.md (the Markdown tables) and log.txt. No network is used. The Python part keeps its own
# time budget (--budget, default 420 s); `timeout` is a hard stop at 470 s so the whole command ends
# within 8 minutes. Works without installing the package (PYTHONPATH=src). CPU smoke test:
#     bash benchmarks/gpu.sh /tmp/smoke --device cpu --tiny
# Then, on a checkout, put the tables into the docs:
#     python benchmarks/gpu_bench.py --render OUTDIR/gpu_bench.json
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
    out="$1"
    shift
else
    out="${OUT:-}"
fi
if [ -z "$out" ]; then
    echo "usage: bash benchmarks/gpu.sh OUTDIR [gpu_bench.py options]   (or set OUT)" >&2
    exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
{ nvidia-smi || echo "nvidia-smi not available"; } >"$out/nvidia-smi.txt" 2>&1
py="$(command -v python3 || command -v python)"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout --kill-after=10 470 "$py" "$here/gpu_bench.py" --out "$out" "$@" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_bench.py hit the 470 s hard limit; partial results are in $out/gpu_bench.json" | tee -a "$out/log.txt"
exit "$rc"
