"""Makes the JPEGs under tests/data/photos/fast/ and records what Pillow gives for them in
draft mode, the reference for `--fast-decode` (libjpeg's DCT scaling).

    .venv/bin/python scripts/make_fast_decode_fixtures.py

`--fast-decode` decodes a JPEG at the largest scale 1/8, 1/4 or 1/2 that keeps both sides
at least `min_side` (twice the model's input size). Pillow's `draft("RGB", (m, m))` picks
the same scale and drives libjpeg the same way, so the reference for each case is
`Image.open(path)`, `draft("RGB", (m, m))`, then transformers' `load_image` steps
(`exif_transpose`, `convert("RGB")`) and BlipImageProcessorPil at the decoded upright
size (no resampling, so every decoded pixel is compared).

Each JPEG is made from tests/data/photos/rocket.jpg scaled to an odd 243x163 (not a
multiple of the 8- or 16-pixel blocks): quality 90 4:2:0 (as cameras write), 4:4:4,
progressive, grayscale, CMYK (Adobe, inverted, as Pillow writes it) and EXIF orientation
6. Deterministic (no randomness).

It writes
  tests/data/photos/fast/*.jpg              the JPEGs
  tests/fixtures/photos/fast/NAME_M.npy      Pillow's draft-mode pixel values
  tests/fixtures/photos/fast/cases.json      file, min_side, scale, upright size, pixels
"""
import json
import os

import numpy as np
from PIL import Image, ImageOps
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SRC = os.path.join(ROOT, "tests", "data", "photos", "rocket.jpg")
DATA = os.path.join(ROOT, "tests", "data", "photos", "fast")
OUT = os.path.join(ROOT, "tests", "fixtures", "photos", "fast")
SIZE = (243, 163)


def exif6():
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def main():
    os.makedirs(DATA, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    base = Image.open(SRC).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
    files = {
        "q90_420.jpg": lambda p: base.save(p, quality=90, subsampling=2),
        "q90_444.jpg": lambda p: base.save(p, quality=90, subsampling=0),
        "progressive.jpg": lambda p: base.save(p, quality=90, progressive=True),
        "gray.jpg": lambda p: base.convert("L").save(p, quality=90),
        "cmyk.jpg": lambda p: base.convert("CMYK").save(p, quality=90),
        "exif6.jpg": lambda p: base.save(p, quality=90, exif=exif6()),
    }
    for name, save in files.items():
        save(os.path.join(DATA, name))
    # min_side 15, 30, 60, 90 give scales 8, 4, 2, 1 on 243x163.
    plan = [("q90_420.jpg", m) for m in (15, 30, 60, 90)]
    plan += [(n, 30) for n in files if n != "q90_420.jpg"]
    cases = []
    for name, m in plan:
        img = Image.open(os.path.join(DATA, name))
        img.draft("RGB", (m, m))
        scale = img.decoderconfig[0]
        img = ImageOps.exif_transpose(img).convert("RGB")
        w, h = img.size
        case = {"photo": name, "min_side": m, "scale": scale, "width": w, "height": h}
        if scale > 1:
            px = BlipImageProcessorPil(size={"height": h, "width": w})(img, return_tensors="np")["pixel_values"][0]
            fname = f"{os.path.splitext(name)[0]}_{m}.npy"
            np.save(os.path.join(OUT, fname), np.ascontiguousarray(px.astype(np.float32)))
            case["pixels"] = fname
        cases.append(case)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"source": SIZE, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
