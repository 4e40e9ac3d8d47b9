#!/usr/bin/env python3
"""PyTorch reference for `cycleserve translate`, and a pixel comparison.

Not a test dependency: it needs torch, safetensors, numpy and pillow, which CI does not install.
It builds both CycleGAN generator families in PyTorch from the architecture in a cycleserve
model file's header, runs one image through the pipeline cycleserve specifies (u8/127.5-1,
reflect-pad right/bottom to a multiple of 4, crop, round((y+1)*127.5)), and writes a PNG.

    pytorch_reference.py translate MODEL.safetensors x2y|y2x INPUT OUTPUT.png
    pytorch_reference.py compare A.png B.png     # share of values within ±1 level
"""
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open


def generator(family, ngf, n_blocks, affine):
    """The ResNet generator with PyTorch's own module indices, so state_dict keys match."""
    def norm(c):
        return nn.InstanceNorm2d(c, affine=affine)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            layers = [nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c), nn.ReLU(True),
                      nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c)]
            setattr(self, "block" if family == "upsample" else "conv_block", nn.Sequential(*layers))

        def forward(self, x):
            body = self.block if family == "upsample" else self.conv_block
            return x + body(x)

    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), norm(ngf), nn.ReLU(True)]
    for mult in (1, 2):
        layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1), norm(ngf * mult * 2), nn.ReLU(True)]
    layers += [Block(4 * ngf) for _ in range(n_blocks)]
    for mult in (4, 2):
        cin, cout = ngf * mult, ngf * mult // 2
        if family == "upsample":
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.ReLU(True)]
        else:
            layers += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1), norm(cout), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    net = nn.Module()
    net.model = nn.Sequential(*layers)
    net.forward = lambda x: net.model(x)
    return net


def load(model_path, direction):
    prefix = {"x2y": "G.", "y2x": "F."}[direction]
    with safe_open(model_path, "pt") as f:
        meta = f.metadata()
        state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    net = generator(meta["family"], int(meta["ngf"]), int(meta["n_blocks"]), meta["norm_affine"] == "true")
    net.load_state_dict(state, strict=True)
    return net.eval()


def translate(model_path, direction, src, dst):
    net = load(model_path, direction)
    image = Image.open(src)
    rgba = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    pixels = np.asarray(image.convert("RGBA" if rgba else "RGB"))
    h, w = pixels.shape[:2]
    x = torch.from_numpy(pixels[..., :3].astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")
    with torch.no_grad():
        y = net(x)[0, :, :h, :w]
    out = ((y + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    if rgba:
        out = np.concatenate([out, pixels[..., 3:]], axis=2)
    Image.fromarray(out).save(dst)


def compare(a, b):
    a = np.asarray(Image.open(a)).astype(int)
    b = np.asarray(Image.open(b)).astype(int)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    print(f"values: {d.size}, max |diff|: {d.max()}, within ±1: {100 * (d <= 1).mean():.4f} %, "
          f"exact: {100 * (d == 0).mean():.4f} %")


if __name__ == "__main__":
    if sys.argv[1] == "translate":
        translate(*sys.argv[2:6])
    elif sys.argv[1] == "compare":
        compare(*sys.argv[2:4])
    else:
        sys.exit(__doc__)
