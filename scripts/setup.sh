#!/usr/bin/env bash
# defectflow set-up: one idempotent script for a fresh Debian machine (run as root or with sudo).
#
#   bash scripts/setup.sh            # Debian engines + .venv with defectflow[test]
#   DEFECTFLOW_VENV=/path bash scripts/setup.sh
#
# What it does, in order:
#   1. apt: Quantum ESPRESSO (pw.x + bundled pseudopotentials), CP2K (+ data), OpenBLAS, OpenMPI, Chromium (the
#      tests render `defectflow report`'s HTML page in headless Chromium).
#   2. a virtual environment (.venv by default);
#   3. torch==2.13.0 FIRST (a CPU wheel; any other torch pulls GBs of CUDA packages);
#   4. defectflow itself (editable) with its test extra.
# A second run checks and skips what is already there (a few seconds).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEFECTFLOW_VENV:-$here/.venv}"
extras="${DEFECTFLOW_EXTRAS:-test}"
python="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*"; }

# ---- 1. Debian packages ---------------------------------------------------------------
apt_pkgs=(quantum-espresso quantum-espresso-data cp2k cp2k-data libopenblas0 openmpi-bin chromium)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# ---- 2. virtual environment -----------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)

# ---- 3. torch first (CPU wheel) --------------------------------------------------------
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  log "pip install torch==2.13.0 (CPU)"
  "${pip[@]}" torch==2.13.0
fi

# ---- 4. defectflow + extras -------------------------------------------------------------
stamp="$venv/.defectflow-setup-stamp"
want="$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "pip install -e .[$extras]"
  "${pip[@]}" -e "$here[$extras]"
  echo "$want" > "$stamp"
else
  log "defectflow[$extras] already installed"
fi
log "ready: $venv"
