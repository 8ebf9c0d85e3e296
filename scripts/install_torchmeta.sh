#!/usr/bin/env bash
# Optional: torchmeta 1.8.0 (its last release) for users of torchmeta's datasets, loaders and
# MetaModules. Its metadata pins torch<1.10 and torchvision<0.11, so it is installed with
# --no-deps next to the current torch, plus the dependencies it imports that torch,
# torchvision and learn2learn do not already bring (h5py, ordered-set). pip will report
# torchmeta's unmet torch/torchvision pins; l2l_adversarial.torchmeta_compat.enable_torchmeta()
# makes it work anyway. Run after scripts/install.sh.
#
#   bash scripts/install_torchmeta.sh
#   VENV=/path/to/venv bash scripts/install_torchmeta.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
[ -x "$PY" ] || { echo "no Python at $PY: run scripts/install.sh first or set VENV" >&2; exit 1; }

"$PY" -m pip install -q 'h5py>=3.8' 'ordered-set>=4.0' 'pillow>=7.0' requests tqdm
"$PY" -m pip install -q --no-deps torchmeta==1.8.0
"$PY" -c 'from l2l_adversarial.torchmeta_compat import enable_torchmeta; print("installed: torchmeta", enable_torchmeta().__version__, "(call enable_torchmeta() before importing it)")'
