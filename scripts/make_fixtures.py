#!/usr/bin/env python3
"""Writes the test fixtures that need PyTorch or Pillow to make (run once; outputs committed).

    make_fixtures.py OUT_DIR    # reads OUT_DIR/golden/generator_upsample.pth

- pth/wrapped.pth: the golden upsample generator saved as {"state_dict": ..., "epoch": 3}
- pth/dataparallel.pth: the same with nn.DataParallel's `module.` key prefix
- pth/extra_key.pth, pth/missing_key.pth: that generator with one key too many / too few
- pth/discriminator.pth: a state_dict that is not a generator at all
- exif_rotated.jpg: 16×8 pixels stored, EXIF orientation 6 (displayed 8×16)
- gray16.png: 16-bit grayscale; gray_alpha.png: 8-bit grayscale with alpha
"""
import os
import sys

import numpy as np
import torch
from PIL import Image

out = sys.argv[1]
os.makedirs(f"{out}/pth", exist_ok=True)
state = torch.load(f"{out}/golden/generator_upsample.pth")
torch.save({"state_dict": state, "epoch": 3}, f"{out}/pth/wrapped.pth")
torch.save({f"module.{k}": v for k, v in state.items()}, f"{out}/pth/dataparallel.pth")
extra = dict(state)
extra["model.99.weight"] = torch.zeros(3)
torch.save(extra, f"{out}/pth/extra_key.pth")
missing = dict(state)
del missing["model.13.bias"]
torch.save(missing, f"{out}/pth/missing_key.pth")
disc = {f"model.{i}.weight": torch.zeros(2, 3, 4, 4) for i in (0, 2)}
torch.save(disc, f"{out}/pth/discriminator.pth")

rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
exif = Image.Exif()
exif[0x0112] = 6
Image.fromarray(pixels).save(f"{out}/exif_rotated.jpg", exif=exif.tobytes(), quality=95)
gray16 = (rng.integers(0, 65536, (12, 10))).astype(np.uint16)
Image.fromarray(gray16).save(f"{out}/gray16.png")
ga = np.stack([rng.integers(0, 256, (9, 11)), np.tile(np.arange(11) * 20, (9, 1))], axis=2).astype(np.uint8)
Image.fromarray(ga, mode="LA").save(f"{out}/gray_alpha.png")
