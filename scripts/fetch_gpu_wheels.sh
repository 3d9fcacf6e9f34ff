#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that a GPU machine with only torch, Triton, PyYAML,
# Pillow and pytest lacks, at the versions requirements/lock.txt pins: megatron-core, pydantic,
# webdataset and PyAV (the video decoder, 35 MB of the 64 MB a device call carries) with their
# own dependencies, for CPython 3.12 on x86-64 Linux. Carry .whl/ to that machine;
# tools/regenerate_gpu_results.py installs it there (docs/results.md).
#   scripts/fetch_gpu_wheels.sh --pins   print the pins only (name==version, one a line)
#   scripts/fetch_gpu_wheels.sh --peers  the benchmark's peers instead (requirements/gpu-peers.txt:
#       flash-attn-4 and its CuTe DSL, 110 MB) into .whl-peers/1 and .whl-peers/2, each under the
#       64 MB a call carries: files over 56 MB are cut into pieces (NAME.whl.part-aa, -ab, ...),
#       one in each folder. Carry .whl-peers/1 in one call and .whl-peers/2 in the next while the
#       machine is warm; the second joins the pieces (cat NAME.whl.part-* > NAME.whl) and installs
#       them with pip --target DIR; run with PYTHONPATH=DIR:DIR/nvidia_cutlass_dsl/dsl_packages (what
#       the CuTe DSL's .pth file adds, which a --target install does not read).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock="${LVX_LOCK:-requirements/lock.txt}"
dest="${WHEEL_DIR:-.whl}"
download=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

if [[ "${1:-}" == --peers ]]; then
    peers="${PEERS_DIR:-.whl-peers}"
    rm -rf "$peers" && mkdir -p "$peers/all" "$peers/1" "$peers/2"
    mapfile -t wanted < <(grep -v '^#' requirements/gpu-peers.txt | grep .)
    "${download[@]}" -d "$peers/all" "${wanted[@]}"
    # Big files are cut in two pieces, one per folder; the others fill folder 2, then folder 1.
    for wheel in "$peers"/all/*.whl; do
        if (($(stat -c %s "$wheel") > 56 * 1024 * 1024)); then
            split -n 2 -d -a 2 "$wheel" "$peers/all/$(basename "$wheel").part-"
            mv "$peers/all/$(basename "$wheel").part-00" "$peers/1/"
            mv "$peers/all/$(basename "$wheel").part-01" "$peers/2/"
            rm "$wheel"
        fi
    done
    for wheel in "$peers"/all/*.whl; do
        used="$(du -sb "$peers/2" | cut -f1)"
        if ((used + $(stat -c %s "$wheel") < 56 * 1024 * 1024)); then mv "$wheel" "$peers/2/"; else mv "$wheel" "$peers/1/"; fi
    done
    rmdir "$peers/all"
    du -sh "$peers"/1 "$peers"/2
    exit 0
fi
packages=(megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand av)

# name==version of each package from the lock (names compared as pip normalises them)
pins_text="$(python3 -c '
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in open(sys.argv[1]):
    name, eq, version = line.strip().partition("==")
    if eq and not line.startswith("#"):
        pins[norm(name)] = version
missing = [p for p in sys.argv[2:] if norm(p) not in pins]
if missing:
    sys.exit(f"error: {sys.argv[1]} pins no " + ", ".join(missing) + " (make lock)")
print("\n".join(f"{p}=={pins[norm(p)]}" for p in sys.argv[2:]))
' "$lock" "${packages[@]}")"
mapfile -t pins <<<"$pins_text"
if [[ "${1:-}" == --pins ]]; then
    printf '%s\n' "${pins[@]}"
    exit 0
fi

mkdir -p "$dest"
for package in "${packages[@]}"; do
    # one version of each package: pip refuses an install that offers two
    normalized="$(echo "$package" | tr '[:upper:]-' '[:lower:]_')"
    rm -f "$dest/$normalized"-*.whl
done
"${download[@]}" -d "$dest" "${pins[@]}"
ls -l "$dest"
