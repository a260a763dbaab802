"""Reconstruction of held-out images through a model's autoencoder (KL or VQ): PSNR and SSIM
of encode → decode against the input, and for a VQ autoencoder the codebook usage on those
images (distinct codes / codebook size, and perplexity of the code histogram). Prints JSON.

    PYTHONPATH=src python bench/eval_autoencoder.py --model FILE --data data/emoji512svg \
        [--size 512] [--batch 4] [--all]

Images are the data folder's held-out rows (`--all`: every row), resized to --size (Lanczos)
as RGB on white; PSNR/SSIM as in eval_upscale.py (8-bit RGB in [0, 1], per image, averaged).
The KL path decodes the posterior mean, as img2img's encode does.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from eval_upscale import psnr, ssim
from sdloom.checkpoints.load import load_model
from sdloom.models.vq import VQModel
from sdloom.training.data import load_rgb, read_items


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--all", action="store_true", help="every row, not only the held-out ones")
    a = ap.parse_args()
    items = read_items(a.data, include_holdout=True)
    if not a.all:
        rows = [json.loads(x) for x in open(f"{a.data}/metadata.jsonl")]
        items = [it for it in items if rows[it.row].get("holdout")]
    ae = load_model(a.model, device="cpu").model.first_stage_model.float().eval()
    vq = isinstance(ae, VQModel)
    t = time.perf_counter()
    p_all, s_all, counts = [], [], None
    for i in range(0, len(items), a.batch):
        imgs = [np.asarray(load_rgb(it.path).resize((a.size, a.size), Image.LANCZOS))
                for it in items[i:i + a.batch]]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if vq:
            h = ae.encode(x)
            idx = ae.quantize.indices(h)
            c = torch.bincount(idx.flatten(), minlength=ae.config.n_embed)
            counts = c if counts is None else counts + c
            y = ae.decode(h)
        else:
            y = ae.decode(ae.encode(x)[0])
        # 8-bit, as a saved image
        y = ((y.clamp(-1, 1) + 1) * 127.5).round() / 255
        x = (x + 1) / 2
        p_all.append(psnr(y, x))
        s_all.append(ssim(y, x))
    out = {"model": a.model, "kind": "vq" if vq else "kl", "images": len(items),
           "size": a.size, "psnr_db": round(torch.cat(p_all).mean().item(), 3),
           "ssim": round(torch.cat(s_all).mean().item(), 4),
           "seconds": round(time.perf_counter() - t, 1)}
    if vq:
        prob = counts.double() / counts.sum()
        nz = prob[prob > 0]
        out.update(codebook=ae.config.n_embed, codes_used=int((counts > 0).sum()),
                   codes_used_fraction=round((counts > 0).double().mean().item(), 4),
                   perplexity=round(torch.exp(-(nz * nz.log()).sum()).item(), 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
