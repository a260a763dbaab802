#!/usr/bin/env bash
# Sets up .venv with sdloom. `--test` adds the test oracles (diffusers, transformers), the
# emoji font the data-set tests render with, and Chromium + Playwright for the web UI test. Works offline against the package registries only.
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
  # Debian packages for the data-set tests (the emoji font) and the web UI's browser test
  need=""
  [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need=" fonts-noto-color-emoji"
  command -v chromium >/dev/null || need="$need chromium"
  if [ -n "$need" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq $need) >/dev/null 2>&1 || \
      echo "note: could not install$need; the tests that need them will be skipped"
  fi
fi
$PIP install --no-deps -e .
.venv/bin/python -c "import torch, sdloom; print('sdloom', sdloom.__version__, 'torch', torch.__version__)"
