# Sourced by the scripts: creates .venv with the pinned stack on first use, then activates it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "== setting up .venv (pinned stack from pyproject.toml; torch 2.13.0 CPU build)"
    "$PYTHON" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[dev]'
    touch .venv/.installed
fi
# shellcheck disable=SC1091
source .venv/bin/activate
