#!/usr/bin/env bash
# Installs everything into ./.venv: torch 2.14.1 + torchvision 0.29.1, learn2learn 0.2.0
# (a wheel built by scripts/build_learn2learn.sh, which says why), this package in editable
# mode with its dev, tensorboard and docs extras, and torchmeta (scripts/install_torchmeta.sh). Verified on
# Python 3.11, 3.12 and 3.13 (README, "Set up").
#
#   bash scripts/install.sh                                  # python3, into ./.venv
#   PYTHON=python3.13 VENV=/path/to/venv bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export VENV="${VENV:-.venv}"

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "l2l-adversarial needs Python >= 3.10, found " + sys.version'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1  # .pyc written on first import: a faster install
if ! "$PY" -c 'import learn2learn' 2>/dev/null; then
  "$PY" -m pip install -q "$(bash scripts/build_learn2learn.sh "$PY")"
fi

"$PY" -m pip install -q --no-deps torchattacks==3.5.1  # test reference; its metadata pins an old requests
"$PY" -m pip install -q -e '.[dev,tensorboard,docs]'  # tensorboard: the train.tensorboard test; docs: make docs
# gym (a learn2learn dependency) prints a deprecation banner from gym-notices on every import;
# gym imports fine without it.
"$PY" -m pip uninstall -q -y gym-notices
bash scripts/install_torchmeta.sh  # optional for users; CI tests the torchmeta path
"$PY" -c 'import sys, torch, learn2learn, l2l_adversarial; print("installed: Python", sys.version.split()[0], "| torch", torch.__version__, "| learn2learn", learn2learn.__version__, "| l2l_adversarial", l2l_adversarial.__version__)'
