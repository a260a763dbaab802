#!/usr/bin/env bash
# The shipped embedded upscaler (128² → 512², docs/embedded-model.md): train its f=4 VAE
# (preset emoji-x4-vae) and then its U-Net (preset emoji-x4) on one H100/H200 in bf16, write
# the fp16 file that becomes src/sdloom/assets/sdloom-emoji-x4.safetensors, check that
# `sdloom upscale` runs it, and measure it against Lanczos on the held-out emoji
# (bench/eval_upscale.py, JSON).
#
# From the repository root:  OUT=/some/folder bash bench/gpu_train_x4.sh
# Environment: OUT (required), DATA (default data/emoji512svg, built by
# `python -m sdloom.training.emoji_svg_data`), PYTHON (default python3),
# VAE_ARGS / X4_ARGS / EVAL_ARGS: extra flags for a dry run on a CPU, e.g.
# VAE_ARGS="--steps 2 --batch-size 2 --device cpu --precision fp32 --num-workers 0"
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
DATA=${DATA:-data/emoji512svg}
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# the CLIP vocabulary (the text encoder reads the empty prompt), when no package provides it
if [ -z "${SDLOOM_CLIP_VOCAB:-}" ] && [ -f "$DATA/bpe_simple_vocab_16e6.txt.gz" ]; then
    export SDLOOM_CLIP_VOCAB="$DATA/bpe_simple_vocab_16e6.txt.gz"
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

start=$(date +%s)
# shellcheck disable=SC2086  # *_ARGS are lists of flags
"$PY" -m sdloom.training.train --data "$DATA" --output "$OUT/x4-vae" --preset emoji-x4-vae \
    --no-progress ${VAE_ARGS:-}
mid=$(date +%s)
# shellcheck disable=SC2086
"$PY" -m sdloom.training.train --data "$DATA" --output "$OUT/x4" --preset emoji-x4 \
    --model "$OUT/x4-vae/model.safetensors" --no-progress ${X4_ARGS:-}
end=$(date +%s)
echo "training took $((end - start)) s: VAE $((mid - start)) s, U-Net $((end - mid)) s"
tail -n 1 "$OUT/x4-vae/metrics.jsonl" "$OUT/x4/metrics.jsonl"

cp "$OUT/x4/model.safetensors" "$OUT/sdloom-emoji-x4.safetensors"
"$PY" - "$OUT/sdloom-emoji-x4.safetensors" <<'EOF'
import os, sys
from safetensors import safe_open
from sdloom.checkpoints.load import load_model
path = sys.argv[1]
with safe_open(path, "pt") as f:
    dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
m = load_model(path, device="cpu").model
print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB, dtypes {sorted(dtypes)}, family "
      f"{m.config.family}, {sum(p.numel() for p in m.parameters())} parameters, "
      f"latent scale {m.config.vae.scale_factor:.5f}")
EOF

# the product path: `sdloom upscale` with the file, on the first held-out image
first=$("$PY" -c "import json,sys; print(next(json.loads(l)['file_name'] for l in
    open(sys.argv[1] + '/metadata.jsonl') if json.loads(l)['holdout']))" "$DATA")
"$PY" -c "from PIL import Image; Image.open('$DATA/$first').convert('RGB').resize((128, 128),
    Image.LANCZOS).save('$OUT/low.png')"
"$PY" -m sdloom.cli upscale "$OUT/low.png" --upscaler "$OUT/sdloom-emoji-x4.safetensors" \
    --output "$OUT/low-x4.png"

# shellcheck disable=SC2086
"$PY" bench/eval_upscale.py --data "$DATA" --model "$OUT/sdloom-emoji-x4.safetensors" \
    --picture "$OUT/upscale-compare.png" ${EVAL_ARGS:-} | tee "$OUT/eval_upscale.json"
# for reference: the same without the input's noise augmentation (the product uses level 20)
# shellcheck disable=SC2086
"$PY" bench/eval_upscale.py --data "$DATA" --model "$OUT/sdloom-emoji-x4.safetensors" \
    --noise-level 0 ${EVAL_ARGS:-} | tee "$OUT/eval_upscale_level0.json"
