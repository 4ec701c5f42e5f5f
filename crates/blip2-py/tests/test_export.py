"""blip2_ort.export writes what `blip2-ort export` writes, and the Model takes a
checkpoint folder too (exported once into the cache)."""

import filecmp
import os

import blip2_ort
from conftest import FIXTURES, PHOTOS


def test_export_equals_the_cli_export(tmp_path, cli):
    for name in ["opt-tiny", "itm-tiny"]:
        ckpt = str(FIXTURES / name / "checkpoint")
        assert blip2_ort.export(ckpt, tmp_path / f"py-{name}") == str(tmp_path / f"py-{name}")
        cli("export", ckpt, "-o", tmp_path / f"cli-{name}", "--quiet")
        files = sorted(os.listdir(tmp_path / f"cli-{name}"))
        assert sorted(os.listdir(tmp_path / f"py-{name}")) == files
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / f"py-{name}", tmp_path / f"cli-{name}", files, shallow=False)
        assert (mismatch, errors) == ([], []), (mismatch, errors)
    # force=True replaces an export.
    blip2_ort.export(str(FIXTURES / "opt-tiny" / "checkpoint"), tmp_path / "py-opt-tiny", force=True, dtype="fp16")
    assert '"fp16"' in (tmp_path / "py-opt-tiny" / "blip2_manifest.json").read_text()


def test_a_checkpoint_folder_is_exported_into_the_cache(tmp_path, monkeypatch, exports, cli_json):
    want = cli_json("infer", "--model", exports["opt-tiny"], "--max-new-tokens", "5", "caption", PHOTOS / "rocket.jpg")
    monkeypatch.setenv("BLIP2_ORT_CACHE", str(tmp_path / "cache"))
    # The ONNX Runtime library is already loaded: the cache moving does not matter.
    m = blip2_ort.Model(FIXTURES / "opt-tiny" / "checkpoint")
    assert m.path.startswith(str(tmp_path / "cache" / "models"))
    assert m.generate(PHOTOS / "rocket.jpg", max_new_tokens=5) == [{"text": w["text"], "token_ids": w["token_ids"]} for w in want]


def test_onnx_runtime_comes_from_the_wheel_beside_the_package(models):
    import importlib.util

    lib = blip2_ort.runtime_library()
    spec = importlib.util.find_spec("onnxruntime")
    folder = list(spec.submodule_search_locations)[0]
    if os.environ.get("ORT_DYLIB_PATH"):
        assert lib == os.environ["ORT_DYLIB_PATH"]
    else:
        assert lib == os.path.join(folder, "capi", blip2_ort._native._runtime_library_name())
