"""The retrieval methods against `blip2-ort infer` on the itm-tiny export: the same
float32 values."""

import numpy as np
import pytest

from conftest import PHOTO_FILES, PHOTOS

TEXTS = ["a photo of a cat", "a rocket on the launch pad", "a man with a camera", "a cat " * 400, "a"]


@pytest.mark.parametrize("batch_size", [8, 2])
def test_embed_images_equals_embed_image(batch_size, exports, models, cli, tmp_path):
    out = tmp_path / "images.npy"
    cli("infer", "--model", exports["itm-tiny"], "--batch-size", batch_size, "embed-image", *PHOTO_FILES, "--format", "npy", "-o", out)
    want = np.load(out)
    got = models["itm-tiny"].embed_images(PHOTO_FILES, batch_size=batch_size)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.flags["WRITEABLE"]


def test_embed_texts_equals_embed_text(exports, models, cli, tmp_path):
    out = tmp_path / "texts.npy"
    cli("infer", "--model", exports["itm-tiny"], "embed-text", *TEXTS, "--format", "npy", "-o", out)
    want = np.load(out)
    with pytest.warns(UserWarning, match="was cut to the model's"):
        got = models["itm-tiny"].embed_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(TEXTS), want.shape[1])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(models["itm-tiny"].embed_texts(TEXTS[0]), want[:1])


@pytest.mark.parametrize("photo", [PHOTOS / "chelsea.png", PHOTOS / "rocket.jpg"])
def test_itm_equals_infer_itm(photo, exports, models, cli_json):
    texts = TEXTS[:3]
    args = [a for t in texts for a in ("--text", t)]
    want = cli_json("infer", "--model", exports["itm-tiny"], "itm", photo, *args)
    got = models["itm-tiny"].itm(photo, texts)
    assert [g["text"] for g in got] == texts
    # The CLI prints float32 values; compare them as float32.
    for g, w in zip(got, want):
        assert np.float32(g["itm"]) == np.float32(w["itm"])
        assert np.float32(g["itc"]) == np.float32(w["itc"])
