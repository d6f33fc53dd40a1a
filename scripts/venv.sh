#!/usr/bin/env bash
# scripts/venv.sh PYTHON VENV PIP-ARGS...: make (or remake) the virtual environment VENV
# from the interpreter PYTHON and pip-install PIP-ARGS into it.
#
# Why a venv: Debian's own python3 refuses pip installs into the system (PEP 668,
# "externally-managed-environment"), and a project should not change the system Python
# anyway. A venv made from another interpreter than PYTHON (the user switched
# PYTHON=/usr/bin/python3) is made anew rather than mixed.
set -euo pipefail
python=$1 venv=$2
shift 2

base=$(command -v "$python" || true)
if [[ -z "$base" ]]; then
    echo "venv: no interpreter '$python': install python3 (apt-get install python3) or set PYTHON=" >&2
    exit 1
fi
base=$(readlink -f "$base")
made_from="$venv/.made-from"
if [[ -x "$venv/bin/python" && -f "$made_from" && "$(cat "$made_from")" != "$base" ]]; then
    echo "venv: $venv was made from $(cat "$made_from"), not $base: making it anew"
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    rm -rf "$venv"
    if ! "$base" -m venv "$venv"; then
        rm -rf "$venv"
        echo "venv: '$base -m venv' failed: on Debian install python3-venv (apt-get install python3-venv)" >&2
        exit 1
    fi
    echo "$base" >"$made_from"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
