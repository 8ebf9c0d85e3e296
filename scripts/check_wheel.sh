#!/usr/bin/env bash
# The user's path: build this package's wheel, pip-install it (not editable) into a new virtual
# environment that already holds torch and learn2learn, and from a folder outside the source
# tree run `l2l-adversarial configs`, a short quickstart, and a one-iteration `train` of a
# bundled config by name (on a generated MiniImageNet cache) with its evaluation.
# Everything happens in a temporary folder, removed at the end.
#
#   bash scripts/check_wheel.sh                          # python3
#   PYTHON=python3.13 bash scripts/check_wheel.sh
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
started=$SECONDS
step() { echo "check_wheel: [$((SECONDS - started)) s] $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

step "a user's virtual environment with torch and learn2learn ($("$PYTHON" --version))"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1  # .pyc written on first import: a faster install
# The learn2learn wheel that scripts/install.sh built (built now if it has not).
"$PY" -m pip install -q "$(bash "$SRC/scripts/build_learn2learn.sh" "$PY")"
before="$("$PY" -m pip list --format=freeze | grep -iE '^(torch|torchvision|learn2learn)==')"

step "build the wheel from the repository's files (tracked and untracked, not ignored)"
mkdir "$WORK/src"
git -C "$SRC" ls-files -z --cached --others --exclude-standard | (cd "$SRC" && xargs -0 tar -cf - --) | tar -xf - -C "$WORK/src"
"$PY" -m pip wheel -q --no-deps "$WORK/src" -w "$WORK/dist"
wheel=("$WORK"/dist/l2l_adversarial-*.whl)

step "pip install ${wheel[0]##*/}"
mkdir "$WORK/user" && cd "$WORK/user"
"$PY" -m pip install -q "${wheel[0]}"
after="$("$PY" -m pip list --format=freeze | grep -iE '^(torch|torchvision|learn2learn)==')"
[ "$before" = "$after" ] || fail "installing the wheel changed torch/learn2learn: $before -> $after"
"$PY" -m pip check
"$PY" -c 'import sys, l2l_adversarial as p; sys.exit(0 if "site-packages" in p.__file__ and not p.__file__.startswith(sys.argv[1]) else "imported from " + p.__file__)' "$SRC"
bin="$WORK/venv/bin"

step "l2l-adversarial configs"
"$bin/l2l-adversarial" configs > configs.txt
shipped=$(ls "$SRC"/l2l_adversarial/app/configs/*.yaml | wc -l)  # every YAML of the source tree
[ "$(grep -c -- '-5w[15]s-' configs.txt)" -eq "$shipped" ] || fail "configs listed $(grep -c -- '-5w[15]s-' configs.txt) bundled configs, not the $shipped of the source tree"
grep -q "site-packages/l2l_adversarial/app/configs" configs.txt || fail "bundled configs not in site-packages"

step "l2l-adversarial quickstart --iterations 2 --tasks 2"
"$bin/l2l-adversarial" quickstart --iterations 2 --tasks 2 --output quickstart --quiet > quickstart.txt
grep -q "| ADML | Adversarial |" quickstart.txt || fail "quickstart printed no ADML row: $(cat quickstart.txt)"

step "l2l-adversarial train mini-imagenet-5w1s-adml + evaluate, small (generated 16x16 cache, 1 iteration, 2 tasks)"
"$PY" - "$SRC/tests" <<'EOF'
import sys

sys.path.insert(0, sys.argv[1])
from data_factories import write_mini_imagenet_cache  # noqa: E402

for mode in ("train", "validation", "test"):
    write_mini_imagenet_cache("data", mode, num_classes=5, images_per_class=4, image_size=16)
EOF
small=(-o dataset.root=data -o dataset.strict=false -o train.iterations=1 -o train.meta_batch_size=1
       -o model.hidden=8 -o task.query_shots=2 -o evaluate.tasks=2 -o evaluate.adaptation_steps=2 --quiet)
"$bin/l2l-adversarial" train mini-imagenet-5w1s-adml --run-dir run "${small[@]}"
grep -q "^method: adml" run/config.yaml || fail "the run's config.yaml is not the bundled ADML config"
"$bin/l2l-adversarial" evaluate run "${small[@]}" > evaluate.txt
grep -q "| ADML | Clean |" evaluate.txt || fail "evaluate printed no ADML row: $(cat evaluate.txt)"

step "an unknown config name: exit 2 and the closest names"
status=0
"$bin/l2l-adversarial" train mini-imagenet-5w1s-amdl -o dataset.root=data 2> unknown.txt || status=$?
[ "$status" -eq 2 ] && grep -q "closest: .*mini-imagenet-5w1s-adml" unknown.txt || fail "exit $status: $(cat unknown.txt)"

step "passed ($("$PY" --version), wheel ${wheel[0]##*/})"
