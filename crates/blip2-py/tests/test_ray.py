"""blip2_ort.ray on a local Ray cluster: read the photos, map_batches with two actors,
write Parquet; the captions and embeddings read back equal `blip2-ort infer`'s.

Ray gets 4 logical CPUs (the two 1-CPU actors leave two for the read and write tasks; with
num_cpus=2 the reads would find no CPU left and the job would stall), whatever the
machine has."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import ray

from blip2_ort.ray import Captioner, Embedder
from conftest import PHOTOS, VARIANTS

# Files whose pixels Ray's read_images(mode="RGB") (Pillow, no EXIF rotation) makes as
# transformers makes them: opaque, upright.
ARRAY_PHOTOS = [PHOTOS / "rocket.jpg", PHOTOS / "camera.png", PHOTOS / "chelsea.png", VARIANTS / "gray.jpg", VARIANTS / "progressive.jpg", VARIANTS / "s422.jpg"]
# Encoded bytes are decoded by blip2-ort as the CLI decodes files: any photo.
BYTES_PHOTOS = ARRAY_PHOTOS + [PHOTOS / "chelsea_rgba.png", VARIANTS / "exif6.jpg", VARIANTS / "exif8.webp"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def by_path(table, column):
    d = table.to_pydict()
    return dict(zip(d["path"], d[column]))


def test_captioner_over_read_images_and_read_binary_files(cluster, exports, cli_json, tmp_path):
    model = exports["t5-tiny"]
    settings = {"prompt": "a photo of", "max_new_tokens": 12}
    want = cli_json("infer", "--model", model, "--max-new-tokens", "12", "caption", *BYTES_PHOTOS, "--prompt", "a photo of")
    want = {str(p): w["text"] for p, w in zip(BYTES_PHOTOS, want)}
    assert len(set(want.values())) > 2, f"the captions must tell the photos apart: {want}"

    for kind, ds in [
        ("arrays", ray.data.read_images([str(p) for p in ARRAY_PHOTOS], mode="RGB", include_paths=True)),
        ("bytes", ray.data.read_binary_files([str(p) for p in BYTES_PHOTOS], include_paths=True)),
    ]:
        out = tmp_path / kind
        ds.map_batches(
            Captioner,
            fn_constructor_kwargs={"model": model, **settings},
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=1,
            batch_size=2,
        ).drop_columns(["image" if kind == "arrays" else "bytes"]).write_parquet(str(out))
        got = by_path(pq.read_table(out), "caption")
        paths = ARRAY_PHOTOS if kind == "arrays" else BYTES_PHOTOS
        assert got == {str(p): want[str(p)] for p in paths}, kind


def test_embedder_over_read_images(cluster, exports, cli, tmp_path):
    model = exports["itm-tiny"]
    cli("infer", "--model", model, "embed-image", *ARRAY_PHOTOS, "--format", "npy", "-o", tmp_path / "want.npy")
    want = {str(p): e for p, e in zip(ARRAY_PHOTOS, np.load(tmp_path / "want.npy"))}
    ray.data.read_images([str(p) for p in ARRAY_PHOTOS], mode="RGB", include_paths=True).map_batches(
        Embedder,
        fn_constructor_kwargs={"model": model},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=1,
        batch_size=2,
    ).drop_columns(["image"]).write_parquet(str(tmp_path / "out"))
    rows = ray.data.read_parquet(str(tmp_path / "out")).take_all()
    assert sorted(r["path"] for r in rows) == sorted(want)
    for r in rows:
        assert r["embedding"].dtype == np.float32
        np.testing.assert_array_equal(r["embedding"], want[r["path"]])


def test_a_bad_setting_fails_at_actor_start(exports):
    with pytest.raises(ValueError, match="top_p"):
        Captioner(exports["t5-tiny"], top_p=2.0)
    with pytest.raises(ValueError, match="Embedder needs an image-text retrieval export"):
        Embedder(exports["opt-tiny"])
    with pytest.raises(ValueError, match="column: the batch has no column 'picture'"):
        Captioner(exports["t5-tiny"], column="picture")({"image": np.zeros((1, 4, 4, 3), np.uint8)})
