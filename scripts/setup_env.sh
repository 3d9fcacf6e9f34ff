#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: Python >= 3.12, the package in
# editable mode and its test tools. Safe to re-run; it reinstalls only when pyproject.toml
# changed. Set PYTHON=/path/to/python3.12 to choose the interpreter, LVX_VENV to move the venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${LVX_VENV:-.venv}"

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

if [[ ! -x "$venv/bin/python" ]] || ! is_312_plus "$venv/bin/python"; then
    python="$(find_python)" || {
        echo "error: lvx-megatron needs Python >= 3.12 (megatron-core 0.17+ does); set PYTHON=/path/to/python3.12" >&2
        exit 1
    }
    echo "creating $venv with $python"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi

stamp="$venv/.lvx-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "installing lvx-megatron and its dependencies into $venv (torch is large the first time)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e ".[test]"
    touch "$stamp"
fi
