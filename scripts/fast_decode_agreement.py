"""How often `--fast-decode` changes the caption: greedy captions of the same JPEGs with
and without the flag, from `blip2-ort infer ... caption --json`, compared token for token.

    python scripts/fast_decode_agreement.py EXPORT [--new-tokens 20] [--bin target/release/blip2-ort]
        [--dir ~/.cache/blip2-ort/bench-photos]

The images: the JPEG photo fixtures of tests/data/photos (rocket.jpg, tests/data/photos/fast,
tests/data/photos/variants) and the 12 MP and 2 MP JPEG sets that scripts/preprocess_bench.py
makes (run it first). Only images that --fast-decode actually scales are counted (a JPEG
under twice the model's input size on either side decodes exactly as without the flag).
Prints, per set: images scaled, captions identical (all --new-tokens ids), and token ids
identical position by position, how many different captions the exact images got (a
random-weight model that gives every image the same caption says nothing), and how far
the model's input moves: the mean and largest difference of the 224x224 RGB input in
0-255 levels, computed with Pillow (`load_image` against `draft` mode, which the tests
show are blip2-ort's exact and --fast-decode pixels).
"""
import argparse
import glob
import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def captions(binary, export, files, new_tokens, fast):
    cmd = [binary, "infer", "--model", export, "caption", "--json", "--max-new-tokens", str(new_tokens),
           "--min-new-tokens", str(new_tokens)]
    if fast:
        cmd.append("--fast-decode")
    out = subprocess.run(cmd + files, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {r["image"]: r["token_ids"] for r in rows}


def input_levels(path, size, min_side):
    """RGB input of the model (resized as BLIP's processor does), exact and in draft mode."""
    import numpy as np
    from PIL import ImageOps

    out = []
    for draft in (False, True):
        img = Image.open(path)
        if draft:
            img.draft("RGB", (min_side, min_side))
        img = ImageOps.exif_transpose(img).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(img, dtype=np.int16))
    d = np.abs(out[0] - out[1])
    return float(d.mean()), int(d.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/blip2-ort"))
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/blip2-ort/bench-photos"))
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.export, "blip2_manifest.json")))
    size = max(manifest["image"]["width"], manifest["image"]["height"])
    min_side = 2 * size
    photos = os.path.join(ROOT, "tests", "data", "photos")
    sets = {
        "photo fixtures (JPEG)": sorted(glob.glob(os.path.join(photos, "*.jpg")) + glob.glob(os.path.join(photos, "fast", "*.jpg"))
                                        + glob.glob(os.path.join(photos, "variants", "*.jpg"))),
        "12 MP JPEG": sorted(glob.glob(os.path.join(a.dir, "12mp", "*.jpg"))),
        "2 MP JPEG": sorted(glob.glob(os.path.join(a.dir, "2mp", "*.jpg"))),
    }
    print(f"`python scripts/fast_decode_agreement.py {' '.join(sys.argv[1:])}` "
          f"(model input {size}, JPEGs scaled when both sides are at least {min_side}; {a.new_tokens} greedy tokens)")
    print()
    print("| images | scaled | captions identical | tokens identical | distinct exact captions | input mean / max diff (levels) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, files in sets.items():
        scaled = []
        for f in files:
            try:
                w, h = Image.open(f).size
            except OSError:
                continue  # the truncated fixtures
            if min(w, h) >= 2 * min_side:
                scaled.append(f)
        if not scaled:
            print(f"| {name} | 0 of {len(files)} | - | - | - | - |")
            continue
        exact = captions(a.bin, a.export, scaled, a.new_tokens, False)
        fast = captions(a.bin, a.export, scaled, a.new_tokens, True)
        same = sum(exact[f] == fast[f] for f in scaled)
        tok = sum(x == y for f in scaled for x, y in zip(exact[f], fast[f]))
        total = sum(len(exact[f]) for f in scaled)
        distinct = len({tuple(exact[f]) for f in scaled})
        diffs = [input_levels(f, size, min_side) for f in scaled]
        mean = sum(d[0] for d in diffs) / len(diffs)
        print(f"| {name} | {len(scaled)} of {len(files)} | {same} ({100 * same / len(scaled):.0f}%) "
              f"| {tok} of {total} ({100 * tok / total:.1f}%) | {distinct} | {mean:.2f} / {max(d[1] for d in diffs)} |")


if __name__ == "__main__":
    main()
