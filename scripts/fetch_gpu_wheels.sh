#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that a GPU machine with only torch, Triton, PyYAML,
# Pillow and pytest lacks, at the versions this checkout's venv runs: megatron-core, pydantic,
# webdataset and PyAV (the video decoder, 35 MB of the 64 MB a device call carries) with their
# own dependencies, for CPython 3.12 on x86-64 Linux. Carry .whl/ to that machine;
# tools/regenerate_gpu_results.py installs it there (docs/results.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${LVX_VENV:-.venv}/bin/python"
dest="${WHEEL_DIR:-.whl}"
packages=(megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand av)

pins=()
for package in "${packages[@]}"; do
    version="$("$python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$package")"
    pins+=("$package==$version")
    # one version of each package: pip refuses an install that offers two
    normalized="$(echo "$package" | tr '[:upper:]-' '[:lower:]_')"
    rm -f "$dest/$normalized"-*.whl
done
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"
ls -l "$dest"
