#!/usr/bin/env bash
# Wheels that the GPU machine lacks, for benchmarks/gpu.sh, downloaded here into .whl/ (ignored by git)
# and carried with the run. Run on this side, in the checkout, before the device call:
#     bash benchmarks/device_prep.sh                      # CPython 3.12 manylinux x86_64: the GPU image's
#     bash benchmarks/device_prep.sh --python 3.11        # wheels for another Python (a CPU dry run)
#     bash benchmarks/device_prep.sh --python 3.12 NAME==VERSION ...   # other packages instead
#
# What gpu_bench.py needs is in the image already (torch, numpy, safetensors; transformers for its
# HF section): `import vop`, the models and a training step need nothing else, and the benchmark feeds
# token ids, so it runs without these wheels. They add CLIP's tokenizer (ftfy, its wcwidth, and
# instant-clip-tokenizer, which needs numpy), so that vop is whole there and the run's report shows the
# tokenizer working ("optional" in its device section). PyAV (av) is left out: nothing there decodes
# video. The device command installs them with pip into /tmp/site (docs/benchmarks.md, "Running the
# GPU benchmark on the device"). Versions: those this project is tested with.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
pyver=3.12
if [ "${1:-}" = "--python" ]; then
    pyver="$2"
    shift 2
fi
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(ftfy==6.3.1 wcwidth==0.7.0 instant-clip-tokenizer==0.1.1)

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
n=$(find .whl -type f -name '*.whl' | wc -l)
if [ "$n" -ne ${#pkgs[@]} ]; then
    echo "expected ${#pkgs[@]} wheels, got $n in .whl/" >&2
    exit 1
fi
echo "wheels for CPython $pyver manylinux x86_64 in .whl/:"
for f in .whl/*.whl; do
    reqs=$(unzip -p "$f" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | cut -d' ' -f2- | paste -sd, - || true)
    printf '  %-90s %6s KiB  needs: %s\n' "$(basename "$f")" "$(( $(stat -c %s "$f") / 1024 ))" "${reqs:-nothing}"
done
# what travels with the call: tracked + untracked-not-ignored files, and the carried .whl (limit 64 MiB)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
total=$((tree + whl))
awk -v t="$tree" -v w="$whl" 'BEGIN { m = 1048576; printf "travels: working tree %.1f MiB + .whl %.1f MiB = %.1f MiB (limit 64 MiB)\n", t / m, w / m, (t + w) / m }'
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "over the 64 MiB limit: remove something from the working tree or .whl/" >&2
    exit 1
fi
