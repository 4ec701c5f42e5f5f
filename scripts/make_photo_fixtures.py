"""Makes the photo variants under tests/data/photos/variants/ and records what
transformers computes for them, so the Rust tests check JPEG decoding, EXIF orientation
and truncated files against transformers bit for bit without Python.

    .venv/bin/python scripts/make_photo_fixtures.py     (after scripts/make_fixtures.py)

Each variant is made from photos already in tests/data/photos (chelsea.png, camera.png),
scaled down so the fixtures stay small: JPEG at quality 60, 75 and 95, each chroma
subsampling, progressive, grayscale, CMYK (as Pillow writes it: Adobe marker, inverted),
CMYK without the Adobe marker, YCCK (Adobe transform 2), EXIF orientation 1-8, orientation
given only by XMP, PNG eXIf, WebP EXIF and TIFF orientation, and a truncated JPEG.
Everything is deterministic (no randomness; Pillow's encoder is deterministic).

It writes
  tests/data/photos/variants/*                the variant files
  tests/fixtures/photos/pixels/NAME.npy       transformers' pixel values: load_image(path)
                                              then BlipImageProcessorPil at the upright
                                              size of the image (no resampling, so every
                                              decoded pixel is compared)
  tests/fixtures/photos/cases.json            the variants, their upright sizes, and the
                                              files transformers refuses, with its error
  tests/fixtures/NAME/reference/photos.json   generate() on a few variants for each tiny
                                              checkpoint (the checkpoints are only read)
"""
import io
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from transformers.image_utils import load_image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PHOTOS = os.path.join(ROOT, "tests", "data", "photos")
VARIANTS = os.path.join(PHOTOS, "variants")
OUT = os.path.join(ROOT, "tests", "fixtures", "photos")
# An odd size, not a multiple of the 8- or 16-pixel JPEG blocks, wider than tall so every
# orientation is visible in the shape.
SIZE = (37, 25)


def base_rgb():
    return Image.open(os.path.join(PHOTOS, "chelsea.png")).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)


def base_gray():
    return Image.open(os.path.join(PHOTOS, "camera.png")).convert("L").resize(SIZE, Image.Resampling.BICUBIC)


def exif_with_orientation(o):
    exif = Image.Exif()
    exif[0x0112] = o
    return exif.tobytes()


def tiff_block(endian, entries):
    """A one-IFD EXIF block written by hand, for layouts Pillow's writer does not make:
    entries are (tag, type, count, 4-byte value field)."""
    import struct
    head = (b"II*\x00" if endian == "<" else b"MM\x00*") + struct.pack(endian + "L", 8)
    ifd = struct.pack(endian + "H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack(endian + "HHL", tag, typ, count) + value
    return b"Exif\x00\x00" + head + ifd + struct.pack(endian + "L", 0)


def xmp_orientation(o):
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"><tiff:Orientation>' + str(o).encode()
            + b"</tiff:Orientation></rdf:Description></rdf:RDF></x:xmpmeta>")


def strip_adobe(data):
    """The same JPEG without its APP14 Adobe segment."""
    i = data.index(b"\xff\xee")
    n = int.from_bytes(data[i + 2:i + 4], "big")
    return data[:i] + data[i + 2 + n:]


def set_adobe_transform(data, transform):
    """The Adobe segment's transform byte (12th byte of its payload) set to `transform`."""
    i = data.index(b"\xff\xeeAdobe") if b"\xff\xeeAdobe" in data else data.index(b"\xff\xee")
    payload = i + 4
    assert data[payload:payload + 5] == b"Adobe"
    b = bytearray(data)
    b[payload + 11] = transform
    return bytes(b)


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def make_variants():
    shutil.rmtree(VARIANTS, ignore_errors=True)
    os.makedirs(VARIANTS)
    rgb, gray = base_rgb(), base_gray()
    files = {}
    files["q95.jpg"] = jpeg_bytes(rgb, quality=95)
    files["q60.jpg"] = jpeg_bytes(rgb, quality=60)
    files["s444.jpg"] = jpeg_bytes(rgb, quality=75, subsampling="4:4:4")
    files["s422.jpg"] = jpeg_bytes(rgb, quality=75, subsampling="4:2:2")
    files["s420.jpg"] = jpeg_bytes(rgb, quality=75, subsampling="4:2:0")
    files["progressive.jpg"] = jpeg_bytes(rgb, quality=80, progressive=True)
    files["progressive_444.jpg"] = jpeg_bytes(rgb, quality=90, progressive=True, subsampling="4:4:4")
    files["rgb_components.jpg"] = jpeg_bytes(rgb, quality=85, keep_rgb=True)
    files["gray.jpg"] = jpeg_bytes(gray, quality=85)
    cmyk = jpeg_bytes(rgb.convert("CMYK"), quality=85)
    files["cmyk_adobe.jpg"] = cmyk
    files["cmyk_plain.jpg"] = strip_adobe(cmyk)
    files["ycck.jpg"] = set_adobe_transform(cmyk, 2)
    for o in range(1, 9):
        files[f"exif{o}.jpg"] = jpeg_bytes(rgb, quality=85, exif=exif_with_orientation(o))
    files["xmp6.jpg"] = jpeg_bytes(
        rgb, quality=85,
        xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
            b"</rdf:RDF></x:xmpmeta>")
    # EXIF layouts cameras write that Pillow's writer does not: little-endian, a LONG
    # Orientation; an Orientation that is text (Pillow then ignores XMP too); EXIF without
    # Orientation, where XMP's element form decides.
    files["exif_le5.jpg"] = jpeg_bytes(rgb, quality=85, exif=tiff_block("<", [(274, 3, 1, b"\x05\x00\x00\x00")]))
    files["exif_long7.jpg"] = jpeg_bytes(rgb, quality=85, exif=tiff_block(">", [(274, 4, 1, b"\x00\x00\x00\x07")]))
    files["exif_text_xmp6.jpg"] = jpeg_bytes(rgb, quality=85, exif=tiff_block(">", [(274, 2, 2, b"6\x00\x00\x00")]),
                                             xmp=xmp_orientation(6))
    files["exif_none_xmp8.jpg"] = jpeg_bytes(rgb, quality=85, exif=tiff_block(">", [(271, 2, 4, b"abc\x00")]),
                                             xmp=xmp_orientation(8))
    files["gray_exif8.jpg"] = jpeg_bytes(gray, quality=85, exif=exif_with_orientation(8))
    buf = io.BytesIO()
    rgb.save(buf, "PNG", exif=exif_with_orientation(6))
    files["exif6.png"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, "WEBP", lossless=True, exif=exif_with_orientation(8))
    files["exif8.webp"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, "TIFF", tiffinfo={0x0112: 3})
    files["orientation3.tif"] = buf.getvalue()
    # Half of a JPEG: the header is whole, the scan stops mid-way.
    files["truncated.jpg"] = files["q95.jpg"][: len(files["q95.jpg"]) // 2]
    files["truncated_progressive.jpg"] = files["progressive.jpg"][: len(files["progressive.jpg"]) * 3 // 4]
    for name, data in files.items():
        with open(os.path.join(VARIANTS, name), "wb") as f:
            f.write(data)
    return sorted(files)


def pixel_fixtures(names):
    shutil.rmtree(os.path.join(OUT, "pixels"), ignore_errors=True)
    os.makedirs(os.path.join(OUT, "pixels"))
    cases, refused = [], []
    for name in names:
        path = os.path.join(VARIANTS, name)
        try:
            img = load_image(path)
        except OSError as e:
            refused.append({"photo": name, "error": str(e)})
            continue
        w, h = img.size
        ip = BlipImageProcessorPil(size={"height": h, "width": w})
        px = ip(img, return_tensors="np")["pixel_values"][0].astype(np.float32)
        fname = os.path.splitext(name)[0] + "_" + os.path.splitext(name)[1][1:] + ".npy"
        np.save(os.path.join(OUT, "pixels", fname), np.ascontiguousarray(px))
        raw = Image.open(path)
        cases.append({"photo": name, "width": w, "height": h, "mode": raw.mode,
                      "orientation": raw.getexif().get(0x0112, 1), "pixels": fname})
    # Cuts of one JPEG, down to the last byte short: Pillow refuses every one.
    whole = open(os.path.join(VARIANTS, "q95.jpg"), "rb").read()
    cuts = []
    for n in (3, 20, 200, len(whole) // 2, len(whole) - 10, len(whole) - 2, len(whole) - 1, len(whole)):
        try:
            Image.open(io.BytesIO(whole[:n])).load()
            cuts.append({"bytes": n, "error": None})
        except (OSError, SyntaxError) as e:
            cuts.append({"bytes": n, "error": str(e).split(" <")[0]})
    bp = BlipImageProcessorPil()
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"image_mean": list(bp.image_mean), "image_std": list(bp.image_std), "cases": cases,
                   "refused": refused, "q95_cuts": cuts}, f, indent=1)
    return cases


GENERATE = ["exif6.jpg", "exif3.jpg", "cmyk_adobe.jpg", "gray.jpg", "progressive.jpg", "q60.jpg"]


def generate_cases():
    """Captions of a few variants on each tiny checkpoint, loaded as transformers' image
    pipelines load a file; written beside (never over) the checkpoint's own references."""
    for name in ("opt-tiny-sharded", "opt-tiny", "t5-tiny"):
        ck = os.path.join(ROOT, "tests", "fixtures", name, "checkpoint")
        model = Blip2ForConditionalGeneration.from_pretrained(ck).eval()
        processor = Blip2Processor.from_pretrained(ck)
        processor.tokenizer.padding_side = "left"
        tok = processor.tokenizer
        t5 = model.config.text_config.model_type == "t5"
        eos = model.generation_config.eos_token_id
        cases = []
        for photo in GENERATE:
            for prompt in ("", "a photo of"):
                enc = processor(images=load_image(os.path.join(VARIANTS, photo)), text=prompt, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=10, do_sample=False)
                skip = 1 if t5 else enc["input_ids"].shape[1]
                seq = []
                for t in out[0, skip:].tolist():
                    if t == eos:
                        break
                    seq.append(t)
                cases.append(dict(name=f"{os.path.splitext(photo)[0]}_{'prompted' if prompt else 'caption'}",
                                  task="caption", images=["variants/" + photo], prompts=[prompt],
                                  generate=dict(max_new_tokens=10), sequences=[seq],
                                  texts=[tok.decode(seq, skip_special_tokens=True).strip()]))
        with open(os.path.join(ROOT, "tests", "fixtures", name, "reference", "photos.json"), "w") as f:
            json.dump({"eos_token_id": eos, "cases": cases}, f, indent=1)
        print(name + ": " + "; ".join(f"{c['name']}: {c['sequences'][0]}" for c in cases))


def main():
    torch.manual_seed(0)
    names = make_variants()
    cases = pixel_fixtures(names)
    print(f"{len(cases)} variants with pixel values")
    generate_cases()


if __name__ == "__main__":
    main()
