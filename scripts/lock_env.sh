#!/usr/bin/env bash
# Refresh requirements/lock.txt (`make lock`): resolve pyproject.toml's dependencies and test extra
# afresh in a new virtual environment and pin every package installed there, transitive ones
# included. torch's local version label (+cpu, +cu130) is dropped, so the pin takes either build.
# Review the diff, run `make test`, then commit the lock with what it changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock=requirements/lock.txt
venv="$(mktemp -d "${TMPDIR:-/tmp}/lvx-lock-XXXXXX")"
trap 'rm -rf "$venv"' EXIT

echo "resolving pyproject.toml's dependencies afresh in $venv"
LVX_VENV="$venv" LVX_UNLOCKED=1 bash scripts/setup_env.sh
{
    echo "# Every package of the CPU development/CI environment (make setup), pinned. Made by"
    echo "# \`make lock\` (scripts/lock_env.sh) from pyproject.toml's dependencies and [test] extra"
    "$venv/bin/python" -c 'import platform; print(f"# with Python {platform.python_version()} on {platform.system()} {platform.machine()}.")'
    echo "# scripts/setup_env.sh installs with it as pip constraints; scripts/fetch_gpu_wheels.sh reads it."
    "$venv/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} >"$lock.tmp"
mv "$lock.tmp" "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") packages); git diff $lock shows what changed"
