"""Captioning throughput of blip2_ort.ray on a local Ray cluster (1 and 2 actors) against
`blip2-ort infer caption` on the same images, in one run: the table of docs/scale-out.md.

    python scripts/ray_throughput.py --model EXPORT --bin target/release/blip2-ort [--images 64]

Makes IMAGES distinct JPEGs (random crops of the photos in tests/data/photos, 640x480,
seeded), then times, each from start to the last caption written (model loading and Ray's
actor start included, as a job pays them): the CLI over all of them (its batch size, with
ONNX Runtime's default threads and with --threads 2), and Ray Data read_binary_files -> map_batches(Captioner) ->
write_parquet with one actor of 2 CPUs and two actors of 1 CPU each (ray.init(num_cpus=4):
the actors leave CPUs for the read and write tasks). Needs blip2_ort installed (pip install
./crates/blip2-py), ray[data] and pillow. Prints a Markdown table.
"""

import argparse
import glob
import os
import random
import subprocess
import sys
import tempfile
import time

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_images(folder, n, seed=0):
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(glob.glob(os.path.join(ROOT, "tests/data/photos/*.*")))
              if not p.endswith(".md")]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = img.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.BICUBIC)
        path = os.path.join(folder, f"img{i:05d}.jpg")
        out.save(path, quality=90)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an export folder")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/blip2-ort"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    a = ap.parse_args()

    import ray
    from blip2_ort.ray import Captioner

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(tmp, a.images)

        for threads in [[], ["--threads", "2"]]:
            start = time.perf_counter()
            out = subprocess.run([a.bin, "infer", "--model", a.model, "--max-new-tokens", str(a.max_new_tokens),
                                  *threads, "--quiet", "caption", *images], check=True, capture_output=True,
                                 text=True).stdout
            cli = time.perf_counter() - start
            assert len(out.splitlines()) == a.images
            rows.append((f"`blip2-ort infer caption {' '.join(threads) or '(default threads)'}`", cli))

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for actors, cpus in [(1, 2), (2, 1)]:
            dest = os.path.join(tmp, f"out-{actors}")
            start = time.perf_counter()
            (ray.data.read_binary_files(images, include_paths=True)
             .map_batches(Captioner, fn_constructor_kwargs={"model": a.model, "threads": cpus,
                                                            "max_new_tokens": a.max_new_tokens},
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, batch_size=8)
             .drop_columns(["bytes"]).write_parquet(dest))
            took = time.perf_counter() - start
            import pyarrow.parquet as pq
            assert pq.read_table(dest).num_rows == a.images
            rows.append((f"Ray Data, {actors} actor{'s' if actors > 1 else ''} x {cpus} CPU", took))
        ray.shutdown()

    print(f"{a.images} images of 640x480, max_new_tokens {a.max_new_tokens}, {os.cpu_count()} cores, model {a.model}")
    print()
    print("| run | seconds | images/s |")
    print("| --- | --- | --- |")
    for name, took in rows:
        print(f"| {name} | {took:.1f} | {a.images / took:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
