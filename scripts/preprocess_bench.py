"""Times image preprocessing: `blip2-ort bench --image` (exact and --fast-decode, on 1, 2
and all cores) against transformers' `load_image(path)` + BLIP-2's image processor
(BlipImageProcessorPil, what Blip2Processor runs on images) in the same run, on photo
sets made here, and prints a Markdown table (--write puts it into docs/PERFORMANCE.md
between the preprocess_bench markers).

    python scripts/preprocess_bench.py [--bin target/release/blip2-ort] [--reps 3]
        [--sets 12mp,2mp,png] [--dir ~/.cache/blip2-ort/bench-photos] [--write]

The photo sets are made once into --dir, deterministically, from the colour photos that
ship in the scikit-image wheel (astronaut, chelsea, coffee, rocket, hubble_deep_field,
motorcycle_left, retina, ihc): each cropped to 4:3, upscaled with Lanczos and given seeded
sensor-like noise (sigma 5) so the files compress like camera photos, then saved as
  12mp  4032x3024 JPEG, quality 90 (4:2:0), as a phone writes them (about 2.4 MB)
  2mp   1632x1224 JPEG, quality 90
  png   1632x1224 PNG
Needs the packages of scripts/requirements-fixtures.txt (Pillow, numpy, torch,
transformers, scikit-image).
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "motorcycle_left", "retina", "ihc"]
SETS = {
    "12mp": ((4032, 3024), "jpg", "12 MP JPEG (4032x3024, q90)"),
    "2mp": ((1632, 1224), "jpg", "2 MP JPEG (1632x1224, q90)"),
    "png": ((1632, 1224), "png", "2 MP PNG (1632x1224)"),
}
BEGIN, END = "<!-- preprocess_bench:begin -->", "<!-- preprocess_bench:end -->"


def source(name):
    import skimage

    d = os.path.join(os.path.dirname(skimage.__file__), "data")
    path = next(os.path.join(d, name + ext) for ext in (".png", ".jpg") if os.path.exists(os.path.join(d, name + ext)))
    img = Image.open(path).convert("RGB")
    w, h = img.size
    # Centre crop to 4:3 landscape.
    if w * 3 > h * 4:
        cw, ch = h * 4 // 3, h
    else:
        cw, ch = w, w * 3 // 4
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def make_sets(out, names):
    files = {}
    for key in names:
        (w, h), ext, _ = SETS[key]
        d = os.path.join(out, key)
        os.makedirs(d, exist_ok=True)
        files[key] = []
        for i, name in enumerate(PHOTOS):
            path = os.path.join(d, f"{name}.{ext}")
            files[key].append(path)
            if os.path.exists(path):
                continue
            img = source(name).resize((w, h), Image.Resampling.LANCZOS)
            rng = np.random.default_rng(1000 + i)
            a = np.asarray(img, dtype=np.float32) + rng.normal(0, 5, (h, w, 3)).astype(np.float32)
            img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
            tmp = path + ".tmp"
            if ext == "jpg":
                img.save(tmp, "JPEG", quality=90)
            else:
                img.save(tmp, "PNG")
            os.replace(tmp, path)
    return files


_processor = None


def _init():
    global _processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    # Blip2Processor's image processor for the released BLIP-2 checkpoints.
    _processor = BlipImageProcessorPil(
        size={"height": 224, "width": 224}, resample=3, image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )


def _one(path):
    from transformers.image_utils import load_image

    return _processor(load_image(path), return_tensors="pt")["pixel_values"].shape[0]


def hf_ms_per_image(files, workers, reps):
    """Wall ms per image over the set, `workers` processes, median of reps after a warm-up."""
    times = []
    with mp.get_context("fork").Pool(workers, initializer=_init) as pool:
        batch = files * max(1, workers)
        pool.map(_one, batch, chunksize=1)
        for _ in range(reps):
            t = time.perf_counter()
            pool.map(_one, batch, chunksize=1)
            times.append((time.perf_counter() - t) * 1000 / len(batch))
    return statistics.median(times)


def pillow_decode_ms(files, reps, draft):
    """Pillow's own read + decode (its bundled libjpeg-turbo), one thread, ms per image:
    `Image.open` + `load`, with `draft` to twice 224 (what --fast-decode asks of libjpeg)
    for JPEGs when `draft`; median of reps."""
    from PIL import Image

    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        for f in files:
            im = Image.open(f)
            if draft:
                im.draft("RGB", (448, 448))
            im.load()
        times.append((time.perf_counter() - t) * 1000 / len(files))
    return statistics.median(times[1:])


def ours(binary, files, workers, reps):
    cmd = [binary, "bench", "--json", "--reps", str(reps), "--workers", ",".join(map(str, workers))]
    for f in files:
        cmd += ["--image", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if not r.get("jpeg_simd"):
        sys.exit(
            f"preprocess_bench: {binary} decodes JPEGs without libjpeg-turbo's SIMD code (built "
            "without nasm); install nasm, `cargo clean --release -p mozjpeg-sys`, build again"
        )
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/blip2-ort"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sets", default="12mp,2mp,png")
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/blip2-ort/bench-photos"))
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = sorted({1, min(2, cores), cores})
    sets = a.sets.split(",")
    for s in sets:
        if s not in SETS:
            sys.exit(f"preprocess_bench: --sets: unknown set {s!r} (12mp, 2mp, png)")
    files = make_sets(a.dir, sets)
    import torch
    import transformers
    import PIL

    torch.set_num_threads(1)
    rows = []
    for s in sets:
        hf = {w: hf_ms_per_image(files[s], w, a.reps) for w in workers}
        r = ours(a.bin, files[s], workers, a.reps)
        mb = statistics.mean(os.path.getsize(f) for f in files[s]) / 1e6
        for w in workers:
            e, f = r[f"exact_w{w}_ms_per_image"], r[f"fast_w{w}_ms_per_image"]
            rows.append((SETS[s][2], mb, w, hf[w], e, f))
        pil = pillow_decode_ms(files[s], a.reps, False)
        pil_draft = pillow_decode_ms(files[s], a.reps, True) if s != "png" else None
        rows.append((SETS[s][2], mb, "split", r["exact_decode_ms"], r["exact_resize_normalize_ms"], r["fast_decode_ms"], r["fast_resize_normalize_ms"], pil, pil_draft))
    lines = [
        f"`python scripts/preprocess_bench.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"({cores} cores, {len(PHOTOS)} photos a set, median of {a.reps}; transformers {transformers.__version__}, "
        f"Pillow {PIL.__version__}, `load_image` + BlipImageProcessorPil in `workers` processes). "
        "ms per image of wall time with every worker busy; ratio = transformers / ours at the same worker count.",
        "",
        "| images | MB/file | workers | transformers ms | exact ms | exact ratio | --fast-decode ms | fast ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row[2] == "split":
            continue
        name, mb, w, hf, e, f = row
        lines.append(f"| {name} | {mb:.1f} | {w} | {hf:.1f} | {e:.1f} | {hf / e:.1f}x | {f:.1f} | {hf / f:.1f}x |")
    lines += [
        "",
        "One worker, split (ms per image): read + decode / RGB + resize + normalize; beside them "
        "Pillow's own read + decode on one thread (`Image.open` + `load`; draft: after "
        "`draft(\"RGB\", (448, 448))`, the scale --fast-decode asks for).",
        "",
    ]
    lines += [
        "| images | exact decode | exact rest | fast decode | fast rest | Pillow decode | Pillow draft decode |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row[2] == "split":
            draft = "-" if row[8] is None else f"{row[8]:.1f}"
            lines.append(f"| {row[0]} | {row[3]:.1f} | {row[4]:.1f} | {row[5]:.1f} | {row[6]:.1f} | {row[7]:.1f} | {draft} |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        path = os.path.join(ROOT, "docs", "PERFORMANCE.md")
        doc = open(path).read()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            doc = head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1]
        else:
            doc += f"\n{BEGIN}\n{table}\n{END}\n"
        open(path, "w").write(doc)


if __name__ == "__main__":
    main()
