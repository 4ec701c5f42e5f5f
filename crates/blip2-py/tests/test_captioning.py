"""Every captioning method against `blip2-ort infer` on the fixture exports: the same
tokens and text for the same images, prompts and settings."""

import pytest

from conftest import PHOTO_FILES, PHOTOS

CAPTIONING = ["opt-tiny", "t5-tiny"]
SETTINGS = [
    ({}, []),
    ({"max_new_tokens": 10}, ["--max-new-tokens", "10"]),
    ({"num_beams": 3, "max_new_tokens": 8}, ["--num-beams", "3", "--max-new-tokens", "8"]),
    (
        {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6, "length_penalty": 0.5},
        ["--num-beams", "3", "--num-return-sequences", "2", "--max-new-tokens", "6", "--length-penalty", "0.5"],
    ),
    (
        {"do_sample": True, "seed": 7, "top_k": 20, "top_p": 0.9, "temperature": 0.8, "max_new_tokens": 8},
        ["--do-sample", "--seed", "7", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--max-new-tokens", "8"],
    ),
    (
        {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 4, "max_new_tokens": 9},
        ["--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2", "--min-new-tokens", "4", "--max-new-tokens", "9"],
    ),
]


def strip(rows):
    """CLI JSON lines as generate() returns them (no image or prompt)."""
    return [{k: v for k, v in r.items() if k not in ("image", "prompt")} for r in rows]


@pytest.mark.parametrize("name", CAPTIONING)
@pytest.mark.parametrize("kwargs,flags", SETTINGS)
def test_generate_and_caption_equal_infer_caption(name, kwargs, flags, exports, models, cli_json):
    m = models[name]
    for prompt in ["", "a photo of"]:
        want = cli_json("infer", "--model", exports[name], *flags, "caption", *PHOTO_FILES, "--prompt", prompt)
        got = m.generate([str(p) for p in PHOTO_FILES], prompt, **kwargs)
        assert got == strip(want)
        texts = m.caption(PHOTO_FILES, prompt or None, **kwargs)
        n = kwargs.get("num_return_sequences", 1)
        if n == 1:
            assert texts == [r["text"] for r in want]
        else:
            assert texts == [[r["text"] for r in want[i : i + n]] for i in range(0, len(want), n)]


@pytest.mark.parametrize("name", CAPTIONING)
def test_batch_size_and_per_image_prompts_equal_infer_batch(name, exports, models, cli_json, tmp_path):
    m = models[name]
    prompts = ["a photo of", "", "Question: what is it? Answer:", "a picture of"]
    images = PHOTO_FILES[:4]
    lines = [f'{{"image": "{p}", "prompt": "{q}"}}' for p, q in zip(images, prompts)]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    want = cli_json("infer", "--model", exports[name], "--batch-size", "3", "--max-new-tokens", "7", "batch", tmp_path / "requests.jsonl")
    want = [{"text": r["text"], "token_ids": r["token_ids"]} for r in want]
    assert m.generate(images, prompts, batch_size=3, max_new_tokens=7) == want


@pytest.mark.parametrize("name", CAPTIONING)
def test_vqa_equals_infer_vqa(name, exports, models, cli_json):
    for photo, question in [(PHOTOS / "camera.png", "what is in the picture?"), (PHOTOS / "rocket.jpg", "where is it?")]:
        want = cli_json("infer", "--model", exports[name], "--max-new-tokens", "10", "vqa", photo, "--question", question)
        assert models[name].vqa(photo, question, max_new_tokens=10) == want[0]["text"]
        got = models[name].generate(photo, want[0]["prompt"], max_new_tokens=10)
        assert got == strip(want)


@pytest.mark.parametrize("name", CAPTIONING)
def test_chat_equals_infer_chat(name, exports, models, cli_json):
    questions = ["what is this?", "and the colour?", "is it outside?"]
    want = cli_json(
        "infer", "--model", exports[name], "--max-new-tokens", "6", "chat", PHOTOS / "chelsea.png",
        stdin="\n".join(questions) + "\n",
    )
    assert len(want) == 3
    history = []
    for q, w in zip(questions, want):
        answer = models[name].chat(PHOTOS / "chelsea.png", history, q, max_new_tokens=6)
        assert answer == w["text"]
        history.append((q, answer))


def test_chat_drops_old_turns_with_a_warning(models):
    m = models["opt-tiny"]
    history = [("question " * 40, "answer " * 40)] * 6
    with pytest.warns(UserWarning, match="dropped the"):
        m.chat(PHOTOS / "rocket.jpg", history, "and now?", max_new_tokens=4)
