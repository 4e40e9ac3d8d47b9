#!/usr/bin/env python3
"""How far one folder of images is from another, file by file (same names, same sizes).

Used to measure what a model file's weight storage costs: translate the same images with the f32
export and with the f16 or int8 one, then compare the two output folders. Prints one JSON line:
images, mean absolute difference in 8-bit levels, the largest difference anywhere, the median of
each image's largest difference, and each image's PSNR (min and median) against the reference.

    compare_images.py REFERENCE_DIR OTHER_DIR

Needs numpy and Pillow only.
"""
import json
import os
import sys

import numpy as np
from PIL import Image


def levels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    reference, other = sys.argv[1:]
    names = sorted(os.listdir(reference))
    if not names:
        sys.exit(f"{reference} holds no images")
    means, largest, psnr = [], [], []
    for name in names:
        a, b = levels(os.path.join(reference, name)), levels(os.path.join(other, name))
        if a.shape != b.shape:
            sys.exit(f"{name}: {a.shape} against {b.shape}")
        diff = np.abs(a - b)
        means.append(diff.mean())
        largest.append(diff.max())
        mse = (diff**2).mean()
        psnr.append(float("inf") if mse == 0 else 10 * np.log10(255**2 / mse))
    print(json.dumps({
        "images": len(names),
        "mean_abs_levels": round(float(np.mean(means)), 4),
        "max_levels": int(max(largest)),
        "median_max_levels": float(np.median(largest)),
        "psnr_db_min": round(float(min(psnr)), 2),
        "psnr_db_median": round(float(np.median(psnr)), 2),
    }))


if __name__ == "__main__":
    main()
