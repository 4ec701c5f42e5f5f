"""How often `--fast-decode` changes the caption: greedy captions of the same JPEGs with
and without the flag, from `blip2-ort infer ... caption --json`, compared token for token.

    python scripts/fast_decode_agreement.py EXPORT [--new-tokens 20] [--bin target/release/blip2-ort]
        [--dir ~/.cache/blip2-ort/bench-photos]

The images: the JPEG photo fixtures of tests/data/photos (rocket.jpg, tests/data/photos/fast,
tests/data/photos/variants) and the 12 MP and 2 MP JPEG sets that scripts/preprocess_bench.py
makes (run it first). Only images that --fast-decode actually scales are counted (a JPEG
under twice the model's input size on either side decodes exactly as without the flag).
Prints, per set: images scaled, captions identical (all --new-tokens ids), and token ids
identical position by position.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/blip2-ort"))
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/blip2-ort/bench-photos"))
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.export, "manifest.json")))
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
    print("| images | scaled | captions identical | tokens identical |")
    print("| --- | ---: | ---: | ---: |")
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
            print(f"| {name} | 0 of {len(files)} | - | - |")
            continue
        exact = captions(a.bin, a.export, scaled, a.new_tokens, False)
        fast = captions(a.bin, a.export, scaled, a.new_tokens, True)
        same = sum(exact[f] == fast[f] for f in scaled)
        tok = sum(x == y for f in scaled for x, y in zip(exact[f], fast[f]))
        total = sum(len(exact[f]) for f in scaled)
        print(f"| {name} | {len(scaled)} of {len(files)} | {same} ({100 * same / len(scaled):.0f}%) "
              f"| {tok} of {total} ({100 * tok / total:.1f}%) |")


if __name__ == "__main__":
    main()
