#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, real QE/CP2K/tblite runs included.
#   bash scripts/test.sh                 # everything (~ minutes on 2 cores)
#   bash scripts/test.sh -m "not slow"   # extra pytest arguments are passed through
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
export OMP_NUM_THREADS=1 MPLBACKEND=Agg
exec "$here/.venv/bin/python" -m pytest --durations=15 "$@"
