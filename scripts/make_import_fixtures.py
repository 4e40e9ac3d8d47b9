#!/usr/bin/env python3
"""Writes the checkpoint-import fixtures: generator layouts as published code bases define them,
the containers they are saved in, hostile files, and PyTorch's output for each (run once; outputs
committed, so `cargo test` needs no torch).

    make_import_fixtures.py OUT_DIR     # e.g. tests/fixtures/import; reads ../photo_250x198.png

Every generator has ngf 8 and 2 residual blocks, weights N(0, 0.2) (norm scales around 1), so
that its output uses the whole range. OUT_DIR/manifest.json lists each case: the file, whether it
holds both generators, the layout the importer must recognise, and per direction the reference
PNG that PyTorch computed from photo_250x198.png (reflect-pad right/bottom to a multiple of 4,
run, crop, round((y + 1) * 127.5)).
"""
import collections
import io
import json
import os
import pickle
import sys
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

NGF, N_BLOCKS = 8, 2


class ResidualBlock(nn.Module):
    """A residual block whose Sequential is stored under any attribute name."""

    def __init__(self, c, attr, norm, dropout):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c), nn.ReLU(True)]
        layers += [nn.Dropout(0.5)] if dropout else []
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c)]
        self.attr = attr
        setattr(self, attr, nn.Sequential(*layers))

    def forward(self, x):
        return x + getattr(self, self.attr)(x)


class Generator(nn.Module):
    """The CycleGAN ResNet generator in the module order every published code base uses.

    transposed=False, attr="block": PyTorch-GAN's GeneratorResNet (nearest Upsample + conv).
    transposed=True, attr="conv_block": the original ResnetGenerator and the minimal
    PyTorch-CycleGAN (ConvTranspose2d(k3, s2, p1, output_padding 1)).
    """

    def __init__(self, transposed, attr, affine=False, dropout=False, track=False):
        super().__init__()

        def norm(c):
            return nn.InstanceNorm2d(c, affine=affine, track_running_stats=track)

        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, NGF, 7), norm(NGF), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(NGF * mult, NGF * mult * 2, 3, stride=2, padding=1), norm(NGF * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(4 * NGF, attr, norm, dropout) for _ in range(N_BLOCKS)]
        for mult in (4, 2):
            cin, cout = NGF * mult, NGF * mult // 2
            if transposed:
                layers += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)]
            else:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1)]
            layers += [norm(cout), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(NGF, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def make(seed, **kwargs):
    torch.manual_seed(seed)
    net = Generator(**kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1 and "weight" in name:  # affine norm scale
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return net.eval()


def translate(net, photo, dst):
    pixels = np.asarray(Image.open(photo).convert("RGB"))
    h, w = pixels.shape[:2]
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")
    with torch.no_grad():
        y = net(x)[0, :, :h, :w]
    out = ((y + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(out).save(dst)


def running_stats(name, kwargs, state):
    """The same weights as PyTorch 0.3 saved them: with running statistics next to every instance
    norm, which instance norm never reads (here: random values, so using them would show)."""
    torch.manual_seed(100)
    old = Generator(**kwargs, track=True)
    old.load_state_dict(state, strict=False)
    with torch.no_grad():
        for key, buf in old.named_buffers():
            if key.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf))
            elif key.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return old.state_dict()


def hostile_zip(dst, pickle_bytes, storages):
    """A torch-style zip: archive/data.pkl and archive/data/KEY, stored uncompressed."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)


def laughs():
    """Nine levels of dicts, each holding ten memo references to the level below (10^9 leaves);
    each level is memoized once filled, so a reader that copies memo entries copies it whole."""
    ops = bytearray(b"\x80\x02}q\x00")
    for level in range(1, 10):
        ops += b"}("
        for i in range(10):
            ops += b"X\x01\x00\x00\x00" + bytes([ord("a") + i]) + b"h" + bytes([level - 1])
        ops += b"uq" + bytes([level])
    ops += b"."
    return bytes(ops)


class HugeStorage:
    pass


class HugeTensor:
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (HugeStorage(), 0, (1 << 20, 1 << 20), (1 << 20, 1), False, collections.OrderedDict()))


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, HugeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", 1 << 40)
        return None


def huge():
    buf = io.BytesIO()
    StoragePickler(buf, protocol=2).dump({"model.1.weight": HugeTensor()})
    return buf.getvalue()


def main(out):
    photo = os.path.join(os.path.dirname(os.path.abspath(out)), "photo_250x198.png")
    os.makedirs(f"{out}/reference", exist_ok=True)
    cases = []
    kinds = {
        "pytorch_gan": dict(transposed=False, attr="block"),
        "resnet_generator": dict(transposed=True, attr="conv_block"),
        "resnet_generator_dropout": dict(transposed=True, attr="conv_block", dropout=True),
        "transpose_block_affine": dict(transposed=True, attr="block", affine=True),
        "minimal_cyclegan": dict(transposed=True, attr="conv_block"),
        "upsample_res_affine": dict(transposed=False, attr="res", affine=True),
        "resnet_generator_b": dict(transposed=True, attr="conv_block"),
    }
    nets = {name: make(seed, **kw) for seed, (name, kw) in enumerate(kinds.items(), 1)}
    for name, net in nets.items():
        translate(net, photo, f"{out}/reference/{name}.png")
    sd = {name: net.state_dict() for name, net in nets.items()}

    def case(file, layout, refs, combined=False, family=None, affine=False):
        cases.append({"file": file, "layout": layout, "combined": combined, "references": refs,
                      "family": family, "norm_affine": affine, "n_blocks": N_BLOCKS, "ngf": NGF})

    # Bare state_dicts of each published layout.
    for name, family, affine in [("pytorch_gan", "upsample", False), ("resnet_generator", "transpose", False),
                                 ("resnet_generator_dropout", "transpose", False),
                                 ("transpose_block_affine", "transpose", True),
                                 ("minimal_cyclegan", "transpose", False),
                                 ("upsample_res_affine", "upsample", True)]:
        torch.save(sd[name], f"{out}/{name}.pth")
        case(f"{name}.pth", name, {"x2y": f"{name}.png"}, family=family, affine=affine)
    # Old PyTorch: running statistics next to every instance norm.
    torch.save(running_stats("minimal_cyclegan", kinds["minimal_cyclegan"], sd["minimal_cyclegan"]), f"{out}/running_stats.pth")
    case("running_stats.pth", "minimal_cyclegan", {"x2y": "minimal_cyclegan.png"}, family="transpose")
    torch.save(running_stats("transpose_block_affine", kinds["transpose_block_affine"], sd["transpose_block_affine"]), f"{out}/running_stats_affine.pth")
    case("running_stats_affine.pth", "transpose_block_affine", {"x2y": "transpose_block_affine.png"},
         family="transpose", affine=True)
    # Containers.
    torch.save({"model": sd["resnet_generator_dropout"], "epoch": 200}, f"{out}/model_key.pth")
    case("model_key.pth", "resnet_generator_dropout", {"x2y": "resnet_generator_dropout.png"}, family="transpose")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd["upsample_res_affine"].items()}},
               f"{out}/state_dict_module.pth")
    case("state_dict_module.pth", "upsample_res_affine", {"x2y": "upsample_res_affine.png"},
         family="upsample", affine=True)
    save_file({k: v.contiguous() for k, v in sd["minimal_cyclegan"].items()}, f"{out}/minimal_cyclegan.safetensors")
    case("minimal_cyclegan.safetensors", "minimal_cyclegan", {"x2y": "minimal_cyclegan.png"}, family="transpose")
    # Both generators in one checkpoint: flat prefixes, nested dicts, DataParallel inside.
    a, b = sd["resnet_generator"], sd["resnet_generator_b"]
    flat = {f"netG_B.{k}": v for k, v in b.items()}
    flat.update({f"netG_A.{k}": v for k, v in a.items()})
    torch.save(flat, f"{out}/combined_netG.pth")
    refs = {"x2y": "resnet_generator.png", "y2x": "resnet_generator_b.png"}
    case("combined_netG.pth", "resnet_generator", refs, combined=True, family="transpose")
    disc = {f"model.{i}.weight": torch.randn(8, 3, 4, 4) for i in (0,)}
    torch.save({"G_BA": b, "G_AB": a, "D_A": disc, "optimizer": {"state": {}, "lr": 2e-4}, "epoch": 5},
               f"{out}/combined_G_AB.pth")
    case("combined_G_AB.pth", "resnet_generator", refs, combined=True, family="transpose")
    torch.save({"genB2A": {f"module.{k}": v for k, v in b.items()},
                "genA2B": {f"module.{k}": v for k, v in a.items()}}, f"{out}/combined_genA2B.pth")
    case("combined_genA2B.pth", "resnet_generator", refs, combined=True, family="transpose")

    # Files to refuse.
    torch.save(nets["pytorch_gan"], f"{out}/whole_module.pth")
    hostile_zip(f"{out}/laughs.pth", laughs(), {})
    hostile_zip(f"{out}/huge.pth", huge(), {"0": b"\0" * 16})

    with open(f"{out}/manifest.json", "w") as f:
        json.dump({"photo": "photo_250x198.png", "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
