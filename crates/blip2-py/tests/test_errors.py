"""Every kind of error is a Python exception naming what is wrong: ValueError (the
argument named), TypeError (a value of the wrong type), FileNotFoundError, RuntimeError
(a model that cannot run); never a crash."""

import os
import shutil

import numpy as np
import pytest

import blip2_ort
from conftest import PHOTOS, VARIANTS

ROCKET = PHOTOS / "rocket.jpg"


def test_missing_model_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        blip2_ort.Model(str(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError, match=r"config: .*none\.toml"):
        blip2_ort.Model(str(tmp_path), config=tmp_path / "none.toml")


def test_a_folder_that_is_no_model(tmp_path, exports):
    with pytest.raises(ValueError, match=r"model: .*neither an exported model"):
        blip2_ort.Model(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exports["opt-tiny"], broken)
    os.remove(broken / "blip2_manifest.json")
    with pytest.raises(ValueError, match="model: .*without its blip2_manifest.json"):
        blip2_ort.Model(broken)


def test_bad_model_arguments(exports):
    with pytest.raises(ValueError, match=r'ep: unknown profile "rocm"'):
        blip2_ort.Model(exports["opt-tiny"], ep="rocm")
    with pytest.raises(ValueError, match="threads"):
        blip2_ort.Model(exports["opt-tiny"], threads=0)
    with pytest.raises(ValueError, match="threads"):
        blip2_ort.Model(exports["opt-tiny"], threads=-2)


def test_a_graph_that_fails_to_load_is_a_runtime_error(exports, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(exports["opt-tiny"], broken)
    (broken / "vision_encoder.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(RuntimeError, match="vision_encoder.onnx"):
        blip2_ort.Model(broken)


def test_image_errors(models, tmp_path):
    m = models["opt-tiny"]
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        m.caption([ROCKET, tmp_path / "nope.jpg"])
    with pytest.raises(ValueError, match=r"images\[1\].*truncated"):
        m.caption([ROCKET, (VARIANTS / "truncated.jpg").read_bytes()])
    with pytest.raises(ValueError, match=r"truncated\.jpg: image file is truncated"):
        m.caption(VARIANTS / "truncated.jpg")
    with pytest.raises(ValueError, match=r"images\[0\].*not an image"):
        m.caption([b"hello"])
    with pytest.raises(ValueError, match=r"images\[1\]: a numpy image must be uint8 of shape \(height, width, 3\)"):
        m.caption([ROCKET, np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match=r"images: a numpy image must be uint8"):
        m.caption(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images: the image is empty"):
        m.caption(np.zeros((0, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"images\[1\]: expected a path, bytes"):
        m.caption([ROCKET, 42])
    with pytest.raises(TypeError, match=r"images: expected an image"):
        m.caption(42)
    with pytest.raises(ValueError, match="images: the list is empty"):
        m.caption([])
    with pytest.raises(TypeError, match="image: expected one image"):
        m.vqa([ROCKET], "what?")


def test_generation_errors(models):
    m = models["opt-tiny"]
    with pytest.raises(ValueError, match="max_new_tokens: must be greater than 0"):
        m.caption(ROCKET, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens: expected a whole number of 0 or more"):
        m.caption(ROCKET, max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"top_p: has to be in \(0, 1\]"):
        m.caption(ROCKET, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        m.caption(ROCKET, temperature=float("nan"))
    with pytest.raises(ValueError, match="num_return_sequences"):
        m.caption(ROCKET, num_return_sequences=3)  # more than num_beams without sampling
    with pytest.raises(ValueError, match="early_stopping: expected True, False or \"never\""):
        m.caption(ROCKET, early_stopping="sometimes")
    with pytest.raises(ValueError, match="batch_size: must be at least 1"):
        m.caption(ROCKET, batch_size=0)
    with pytest.raises(TypeError, match="caption\\(\\) got an unexpected keyword argument 'max_tokens'"):
        m.caption(ROCKET, max_tokens=5)
    with pytest.raises(TypeError, match="num_beams: expected an int"):
        m.caption(ROCKET, num_beams=2.5)
    with pytest.raises(TypeError, match="do_sample: expected a bool"):
        m.caption(ROCKET, do_sample="yes")


def test_prompt_errors(models):
    m = models["opt-tiny"]
    with pytest.raises(ValueError, match=r"prompt: the prompt .* tokens"):
        m.caption(ROCKET, "word " * 2000)
    with pytest.raises(ValueError, match=r"prompt: .* plus max_new_tokens 120 exceeds"):
        m.caption(ROCKET, "a photo of", max_new_tokens=120)
    with pytest.raises(ValueError, match="prompts: 1 prompts for 2 images"):
        m.generate([ROCKET, ROCKET], ["a"])
    with pytest.raises(TypeError, match=r"prompts\[1\]: expected a string"):
        m.generate([ROCKET, ROCKET], ["a", 3])
    with pytest.raises(ValueError, match="question: is empty"):
        m.chat(ROCKET, [], "  ")
    with pytest.raises(ValueError, match="question: the question alone makes a prompt"):
        m.chat(ROCKET, [], "why " * 2000)
    with pytest.raises(TypeError, match=r"history\[0\]: expected a list of \(question, answer\) pairs"):
        m.chat(ROCKET, [("only a question",)], "why?")


def test_the_wrong_kind_of_export(models):
    with pytest.raises(ValueError, match=r"model: .*retrieval export has no caption\(\)"):
        models["itm-tiny"].caption(ROCKET)
    with pytest.raises(ValueError, match=r"model: .*captioning export has no embed_images\(\)"):
        models["opt-tiny"].embed_images(ROCKET)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a string"):
        models["itm-tiny"].embed_texts(["a", None])


def test_export_errors(tmp_path, exports):
    ckpt = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures", "opt-tiny", "checkpoint")
    with pytest.raises(ValueError, match='dtype: expected one of "fp32", "fp16", got "fp8"'):
        blip2_ort.export(ckpt, tmp_path / "x", dtype="fp8")
    with pytest.raises(ValueError, match="quantize"):
        blip2_ort.export(ckpt, tmp_path / "x", quantize="int2")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        blip2_ort.export(tmp_path / "no-checkpoint", tmp_path / "x")
    with pytest.raises(ValueError, match="out: .*already exists; pass force=True"):
        blip2_ort.export(ckpt, exports["opt-tiny"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        blip2_ort.export(empty, tmp_path / "y")
    assert not (tmp_path / "y").exists()
