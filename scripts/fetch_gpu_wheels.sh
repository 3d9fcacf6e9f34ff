#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that a GPU machine with only torch, Triton, PyYAML,
# Pillow and pytest lacks, at the versions requirements/lock.txt pins: megatron-core, pydantic,
# webdataset and PyAV (the video decoder, 35 MB of the 64 MB a device call carries) with their
# own dependencies, for CPython 3.12 on x86-64 Linux. Carry .whl/ to that machine;
# tools/regenerate_gpu_results.py installs it there (docs/results.md).
#   scripts/fetch_gpu_wheels.sh --pins   print the pins only (name==version, one a line)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock="${LVX_LOCK:-requirements/lock.txt}"
dest="${WHEEL_DIR:-.whl}"
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
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"
ls -l "$dest"
