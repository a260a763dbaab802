#!/usr/bin/env bash
# Sets up .venv with sdloom. `--test` adds the test oracles (diffusers, transformers), Playwright,
# and two Debian packages the tests need: Chromium (driven by Playwright, no browser download)
# and the Noto Color Emoji font. As root it installs them with apt-get; otherwise it says what
# to run and exits non-zero, because the README's test command fails (never skips) without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch (or a package that pulls one) brings a multi-GB CUDA build
$PIP install "torch==2.13.0"
$PIP install -r requirements.txt
# the CLIP BPE vocabulary ships in clip-anytorch; --no-deps keeps its torchvision pin away
$PIP install --no-deps "clip-anytorch==2.6.0"
# T5's tokenizer.json (SD3/Flux) ships in diffsynth 1.x; --no-deps: only the file is read, never imported
$PIP install --no-deps "diffsynth==1.1.9"
if [ "${1:-}" = "--test" ]; then
  $PIP install -r requirements-test.txt
fi
$PIP install --no-deps -e .
.venv/bin/python -c "import torch, sdloom; print('sdloom', sdloom.__version__, 'torch', torch.__version__)"

if [ "${1:-}" = "--test" ]; then
  FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
  missing() {
    local need=""
    [ -f "$FONT" ] || need="$need fonts-noto-color-emoji"
    command -v chromium >/dev/null || need="$need chromium"
    echo "$need"
  }
  need=$(missing)
  if [ -n "$need" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    need=$(missing)
  fi
  if [ -n "$need" ]; then
    echo "error: the tests need the Debian packages:$need" >&2
    echo "       run:  sudo apt-get install$need" >&2
    echo "       then: scripts/install.sh --test" >&2
    exit 1
  fi
fi
