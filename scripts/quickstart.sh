#!/usr/bin/env bash
# Set up (idempotent) and run the quick campaign on the local engines.
#   bash scripts/quickstart.sh                        # workflows/quickstart.yaml into ./runs/
#   bash scripts/quickstart.sh my_campaign.yaml       # any campaign file
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
export OMP_NUM_THREADS=1 MPLBACKEND=Agg
exec "$here/.venv/bin/defectflow" run "${1:-$here/workflows/quickstart.yaml}"
