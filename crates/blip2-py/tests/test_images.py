"""Each kind of image input gives the CLI's result for the same image: paths (str and
pathlib), bytes (and bytearray, memoryview), Pillow images and numpy uint8 HxWx3 arrays,
one image or a list."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import PHOTO_FILES, PHOTOS, VARIANTS


@pytest.fixture(scope="module")
def reference(exports, cli_json):
    """The CLI's token ids for every photo (opt-tiny, "a photo of", 8 tokens)."""
    rows = cli_json("infer", "--model", exports["opt-tiny"], "--max-new-tokens", "8", "caption", *PHOTO_FILES, "--prompt", "a photo of")
    return {str(p): r["token_ids"] for p, r in zip(PHOTO_FILES, rows)}


def ids(model, images):
    return [r["token_ids"] for r in model.generate(images, "a photo of", max_new_tokens=8)]


def pil_as_transformers_loads(path):
    """A Pillow image of the file as transformers' load_image makes it (EXIF applied)."""
    img = Image.open(path)
    img.load()
    return ImageOps.exif_transpose(img)


def test_paths_str_and_pathlib(models, reference):
    m = models["opt-tiny"]
    assert ids(m, [str(p) for p in PHOTO_FILES]) == list(reference.values())
    assert ids(m, list(PHOTO_FILES)) == list(reference.values())
    assert ids(m, tuple(PHOTO_FILES)) == list(reference.values())
    # One image, not in a list.
    assert ids(m, PHOTO_FILES[0]) == [reference[str(PHOTO_FILES[0])]]
    assert ids(m, str(PHOTO_FILES[1])) == [reference[str(PHOTO_FILES[1])]]


def test_bytes_bytearray_memoryview(models, reference):
    m = models["opt-tiny"]
    data = [Path(p).read_bytes() for p in PHOTO_FILES]
    assert ids(m, data) == list(reference.values())
    assert ids(m, [bytearray(d) for d in data[:3]]) == list(reference.values())[:3]
    assert ids(m, [memoryview(d) for d in data[:3]]) == list(reference.values())[:3]
    assert ids(m, data[5]) == [reference[str(PHOTO_FILES[5])]]


def test_pil_images(models, reference):
    m = models["opt-tiny"]
    # Modes RGB, RGBA (composited onto white as transformers does), P (GIF), L (gray),
    # CMYK, and EXIF-rotated files once transposed as transformers' load_image does.
    images = [pil_as_transformers_loads(p) for p in PHOTO_FILES]
    modes = {img.mode for img in images}
    assert {"RGB", "RGBA", "P", "L", "CMYK"} <= modes, modes
    assert ids(m, images) == list(reference.values())
    assert ids(m, images[0]) == [reference[str(PHOTO_FILES[0])]]


def test_numpy_arrays(models, reference):
    m = models["opt-tiny"]
    opaque = [p for p in PHOTO_FILES if p.name not in ("chelsea_rgba.png", "no_time_for_that_tiny.gif")]
    arrays = [np.asarray(pil_as_transformers_loads(p).convert("RGB")) for p in opaque]
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in arrays)
    assert ids(m, arrays) == [reference[str(p)] for p in opaque]
    # A view that is not contiguous: every other column of a twice-as-wide image.
    wide = np.repeat(arrays[0], 2, axis=1)[:, ::2]
    assert not wide.flags["C_CONTIGUOUS"]
    assert ids(m, wide) == [reference[str(opaque[0])]]


def test_a_mixed_list(models, reference):
    m = models["opt-tiny"]
    p = PHOTOS / "rocket.jpg"
    mixed = [str(p), p.read_bytes(), Image.open(p), np.asarray(Image.open(p)), p]
    assert ids(m, mixed) == [reference[str(p)]] * 5


def test_retrieval_takes_every_kind(models, exports, cli):
    r = models["itm-tiny"]
    p = VARIANTS / "exif6.jpg"
    base = r.embed_images(p)
    for same in [str(p), p.read_bytes(), pil_as_transformers_loads(p), np.asarray(pil_as_transformers_loads(p))]:
        np.testing.assert_array_equal(r.embed_images(same), base)
    assert [d["itm"] for d in r.itm(p.read_bytes(), ["a cat"])] == [d["itm"] for d in r.itm(p, ["a cat"])]
