#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: Python >= 3.12, the package in editable
# mode and its test tools, every package at the version requirements/lock.txt pins. Safe to re-run;
# it reinstalls only when pyproject.toml or the lock changed.
#   PYTHON=/path/to/python3.12   the interpreter (default: the first Python >= 3.12 found)
#   LVX_VENV=DIR                 the venv's folder (default .venv)
#   LVX_TORCH=auto|cpu|pypi      where torch comes from: `cpu` torch's CPU wheels
#                                (download.pytorch.org/whl/cpu), `pypi` PyPI's default (CUDA) build;
#                                `auto` (default): CPU wheels on a machine without an NVIDIA GPU when
#                                that index answers, else PyPI's build (it runs on CPU too)
#   LVX_UNLOCKED=1               resolve afresh, ignoring the lock (scripts/lock_env.sh uses it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${LVX_VENV:-.venv}"
lock=requirements/lock.txt
torch_source="${LVX_TORCH:-auto}"
cpu_index=https://download.pytorch.org/whl/cpu

case "$torch_source" in
    auto | cpu | pypi) ;;
    *)
        echo "error: LVX_TORCH=$torch_source: expected auto, cpu or pypi" >&2
        exit 2
        ;;
esac

is_312_plus() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidate version
    for candidate in "${PYTHON:-}" python3.12 python3.13 python3; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 && is_312_plus "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | sort -V); do
            candidate="$(pyenv prefix "$version")/bin/python3"
            if is_312_plus "$candidate"; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    return 1
}

cpu_index_answers() {
    "$venv/bin/python" -c 'import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)
except Exception:
    sys.exit(1)' "$cpu_index" >/dev/null 2>&1
}

# pip's arguments for torch: the CPU wheels' index, or none (PyPI and pip's configured indexes)
torch_index() {
    local gpu=no
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && gpu=yes
    if [[ "$torch_source" == pypi || ("$torch_source" == auto && "$gpu" == yes) ]]; then
        echo "torch: PyPI's build" >&2
        return 0
    fi
    if cpu_index_answers; then
        echo "torch: the CPU wheels of $cpu_index" >&2
        echo "--index-url $cpu_index --extra-index-url https://pypi.org/simple"
    elif [[ "$torch_source" == cpu ]]; then
        echo "error: LVX_TORCH=cpu but $cpu_index does not answer; use LVX_TORCH=pypi or auto" >&2
        return 2
    else
        echo "torch: no GPU here, but $cpu_index does not answer: PyPI's build (CUDA libraries; it runs on CPU)" >&2
    fi
}

if [[ ! -x "$venv/bin/python" ]] || ! is_312_plus "$venv/bin/python"; then
    python="$(find_python)" || {
        echo "error: lvx-megatron needs Python >= 3.12 (megatron-core 0.17+ does); set PYTHON=/path/to/python3.12" >&2
        exit 1
    }
    echo "creating $venv with $python"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi

constraints=(-c "$lock")
if [[ "${LVX_UNLOCKED:-0}" == 1 ]]; then
    constraints=()
fi
stamp="$venv/.lvx-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || "$lock" -nt "$stamp" || "${LVX_UNLOCKED:-0}" == 1 ]]; then
    echo "installing lvx-megatron and its dependencies into $venv${constraints[*]:+ at the versions of $lock}"
    "$venv/bin/python" -m pip install --quiet --upgrade "${constraints[@]}" pip
    index="$(torch_index)"
    # torch alone first: its index may be another than the other packages'
    # shellcheck disable=SC2086  # $index is zero or four words
    "$venv/bin/python" -m pip install --quiet "${constraints[@]}" $index torch
    "$venv/bin/python" -m pip install --quiet "${constraints[@]}" -e ".[test]"
    touch "$stamp"
fi
