#!/usr/bin/env bash
# The shipped canny ControlNet for the embedded model: train it (preset emoji-canny, about 90 s
# on one H100/H200 in bf16), write the fp16 file that becomes
# src/sdloom/assets/sdloom-emoji-canny.safetensors, check that it loads for the embedded model,
# and measure edge agreement with and without it (bench/eval_control.py, JSON).
#
# From the repository root:  OUT=/some/folder bash bench/gpu_train_canny.sh
# Environment: OUT (required), DATA (default data/emoji128), PYTHON (default python3),
# TRAIN_ARGS / EVAL_ARGS: extra flags, e.g. TRAIN_ARGS="--steps 5 --batch-size 8 --device cpu"
# EVAL_ARGS="--n 2 --steps 4 --device cpu" for a dry run on a CPU.
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
DATA=${DATA:-data/emoji128}
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

start=$(date +%s)
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
"$PY" -m sdloom.training.train --data "$DATA" --output "$OUT/emoji-canny" \
    --preset emoji-canny --no-progress ${TRAIN_ARGS:-}
echo "training took $(( $(date +%s) - start )) s (all of it: data, latents, hints, steps)"

cp "$OUT/emoji-canny/controlnet.safetensors" "$OUT/sdloom-emoji-canny.safetensors"
"$PY" - "$OUT/sdloom-emoji-canny.safetensors" <<'EOF'
import os, sys, torch
from safetensors import safe_open
from sdloom.controlnet import load_controlnet
from sdloom.families.sd_presets import EMBEDDED
path = sys.argv[1]
with safe_open(path, "pt") as f:
    dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    meta = f.metadata()
net = load_controlnet(path, EMBEDDED.unet, 4, torch.device("cpu"), torch.float32)
print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB, dtypes {sorted(dtypes)}, "
      f"{sum(p.numel() for p in net.parameters())} parameters, loads for the embedded model; "
      f"base {meta['sdloom_base_model']}, preprocessor {meta['sdloom_preprocessor']}, "
      f"step {meta['sdloom_step']}")
EOF

# shellcheck disable=SC2086
"$PY" bench/eval_control.py --controlnet "$OUT/sdloom-emoji-canny.safetensors" --data "$DATA" \
    --grid "$OUT/canny-grid.png" ${EVAL_ARGS:-} | tee "$OUT/eval_control.json"
