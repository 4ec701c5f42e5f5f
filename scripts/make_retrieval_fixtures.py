"""Makes tiny random BLIP-2 image-text retrieval checkpoints (the shape of
Salesforce/blip2-itm-vit-g: Blip2ForImageTextRetrieval, no language model) under
tests/fixtures/ and records what transformers computes for them, so the Rust tests need
no Python.

    .venv/bin/pip install -r scripts/requirements-fixtures.txt
    .venv/bin/python scripts/make_retrieval_fixtures.py

Seeded: running it again gives the same files. For each checkpoint it writes
  tests/fixtures/NAME/checkpoint/   the Hugging Face folder (config, weights, WordPiece tokenizer)
  tests/fixtures/NAME/reference/    transformers' outputs (reference.json and *.npy):
      image_features.npy  the vision model's last hidden state for each photo
      image_embeds.npy    normalized query embeddings [photos, queries, dim] (ITC image side)
      text_embeds.npy     normalized [CLS] text embeddings [texts, dim] (ITC text side)
      itm.npy             ITM match probabilities [photos, texts] (softmax, second entry)
      itm_logits.npy      the ITM head's two logits [photos, texts, 2]
      itc.npy             ITC scores [photos, texts] (max over queries of the cosine)
and the token ids the processor gives each text (image tokens stripped, as the model does).

The two checkpoints cover both config variants and both Hub layouts:
  itm-tiny          transformers 5 layout, image_token_index set (the processor prepends
                    num_query_tokens image tokens, the model strips them), 224 px images
  itm-tiny-sharded  older Hub layout (two shards + index, flat preprocessor_config.json,
                    no processor_config.json), no image_token_index, 60 px images
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, Blip2TextModelWithProjection,
                          Blip2VisionModelWithProjection, PreTrainedTokenizerFast)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import FIX, WORDS, load_image, save_npy  # noqa: E402

# PNG and GIF: decoded bit for bit as Pillow decodes them, so end-to-end results are held to
# 1e-5 (JPEG decoding has its own photo fixtures).
PHOTOS = ["chelsea.png", "camera.png", "no_time_for_that_tiny.gif"]
# Short and long texts, words split into pieces (xylophones), unknown ones (42), upper
# case and accents (the tokenizer lowercases and strips them), punctuation.
TEXTS = ["a photo of a cat", "A rocket launch!", "two men standing near the large grey camera on the street",
         "xylophones 42, cafés"]

CONFIGS = {
    "itm-tiny": dict(
        layout="v5", image_token=True, image_size=224,
        vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                     cross_attention_frequency=2, encoder_hidden_size=32, layer_norm_eps=1e-12,
                     max_position_embeddings=40, use_qformer_text_input=True),
        num_query_tokens=6, image_text_hidden_size=16),
    "itm-tiny-sharded": dict(
        layout="sharded", image_token=False, image_size=60,
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    image_size=60, patch_size=12, qkv_bias=False, layer_norm_eps=1e-5),
        qformer=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=36,
                     cross_attention_frequency=1, encoder_hidden_size=24, layer_norm_eps=1e-12,
                     max_position_embeddings=32, use_qformer_text_input=True),
        num_query_tokens=4, image_text_hidden_size=12),
}


def bert_tokenizer():
    """A lowercasing WordPiece shaped like bert-base-uncased: [CLS] text [SEP], [PAD] is 0.
    The vocabulary is listed, not trained (the trainer's order of ties is not reproducible):
    the specials, the fixture words, single letters and their ## continuations, a few
    suffixes and punctuation. Digits are left out, so they become [UNK]."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted(set(WORDS))
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", ",", ".", "?", "'"] + letters
             + ["##" + c for c in letters] + ["##s", "##ing", "##ed"] + [w for w in words if w not in letters])
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]")
    fast.padding_side = "right"
    return fast


def to_old_layout(ckdir):
    """The layout of the older Hub checkpoints: two shards with an index and a flat
    preprocessor_config.json (no processor_config.json, so no num_query_tokens)."""
    sd = load_file(os.path.join(ckdir, "model.safetensors"))
    names = sorted(sd)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    index = {"metadata": {"total_size": int(sum(t.numel() * t.element_size() for t in sd.values()))},
             "weight_map": {}}
    os.remove(os.path.join(ckdir, "model.safetensors"))
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in keys}, os.path.join(ckdir, fname), metadata={"format": "pt"})
        for k in keys:
            index["weight_map"][k] = fname
    with open(os.path.join(ckdir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(ckdir, "processor_config.json")) as f:
        pc = json.load(f)
    ip = pc["image_processor"]
    ip["processor_class"] = "Blip2Processor"
    with open(os.path.join(ckdir, "preprocessor_config.json"), "w") as f:
        json.dump(ip, f, indent=2)
    os.remove(os.path.join(ckdir, "processor_config.json"))


def build(name, spec):
    torch.manual_seed(4321)
    base = os.path.join(FIX, name)
    ckdir = os.path.join(base, "checkpoint")
    refdir = os.path.join(base, "reference")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(ckdir)
    tok = bert_tokenizer()
    size = spec["image_size"]
    nq = spec["num_query_tokens"]
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
                               tokenizer=tok, num_query_tokens=nq if spec["image_token"] else None)
    image_token = tok.convert_tokens_to_ids("<image>")
    qformer = dict(spec["qformer"], vocab_size=image_token)  # <image> is the first id past the vocabulary
    cfg = Blip2Config(vision_config=spec["vision"], qformer_config=qformer, num_query_tokens=nq,
                      image_text_hidden_size=spec["image_text_hidden_size"],
                      image_token_index=image_token if spec["image_token"] else None)
    cfg.architectures = ["Blip2ForImageTextRetrieval"]
    model = Blip2ForImageTextRetrieval(cfg).eval()
    # Random init leaves every score near the same value; widen the weights so they differ.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3 if "embed" in n or n == "query_tokens" else 0.15)
    model.save_pretrained(ckdir, safe_serialization=True)
    processor.save_pretrained(ckdir)
    if spec["layout"] == "sharded":
        to_old_layout(ckdir)
        # The older layout has no processor_config.json: the processor takes its settings
        # from the flat preprocessor_config.json and knows no num_query_tokens.
        processor = Blip2Processor(image_processor=BlipImageProcessorPil.from_pretrained(ckdir),
                                   tokenizer=PreTrainedTokenizerFast.from_pretrained(ckdir))
    else:
        processor = Blip2Processor.from_pretrained(ckdir)
    model = Blip2ForImageTextRetrieval.from_pretrained(ckdir).eval()
    assert (model.config.image_token_index is not None) == spec["image_token"]

    images = [load_image(p) for p in PHOTOS]
    with torch.no_grad():
        pix = processor(images=images, return_tensors="pt")["pixel_values"]
        feats = model.vision_model(pix).last_hidden_state
        # ITC for every photo against every text, in one call.
        enc = processor(images=images[:1], text=TEXTS, padding=True, return_tensors="pt")
        if spec["image_token"]:
            assert (enc["input_ids"][:, :nq] == image_token).all()
        itc_logits, image_embeds = [], []
        for i in range(len(PHOTOS)):
            out = model(pixel_values=pix[i:i + 1], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        use_image_text_matching_head=False)
            itc_logits.append(out.logits_per_image[0])
            image_embeds.append(out.image_embeds[0])
            text_embeds = out.text_embeds
        itc = torch.stack(itc_logits)
        image_embeds = torch.stack(image_embeds)
        # ITM: each photo with each text (the photo repeated along the batch of texts).
        itm_logits = []
        for i in range(len(PHOTOS)):
            px = pix[i:i + 1].expand(len(TEXTS), -1, -1, -1)
            out = model(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        use_image_text_matching_head=True)
            itm_logits.append(out.logits_per_image)
        itm_logits = torch.stack(itm_logits)
        itm = itm_logits.softmax(dim=-1)[..., 1]

        # The standalone projection models load the same checkpoint and must agree.
        vis = Blip2VisionModelWithProjection.from_pretrained(ckdir).eval()
        assert torch.allclose(vis(pixel_values=pix).image_embeds, image_embeds, atol=1e-6)
        txt = Blip2TextModelWithProjection.from_pretrained(ckdir).eval()
        text_only = processor(text=TEXTS, padding=True, return_tensors="pt")
        assert torch.allclose(txt(**text_only).text_embeds[:, 0], text_embeds, atol=1e-6)
        # Each text alone gives the same embedding as in the padded batch.
        for j, t in enumerate(TEXTS):
            one = processor(text=[t], return_tensors="pt")
            assert torch.allclose(txt(**one).text_embeds[0, 0], text_embeds[j], atol=1e-6)

    ids = enc["input_ids"][:, nq:] if spec["image_token"] else enc["input_ids"]
    mask = enc["attention_mask"][:, nq:] if spec["image_token"] else enc["attention_mask"]
    tokens = [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]
    save_npy(os.path.join(refdir, "image_features.npy"), feats.numpy())
    save_npy(os.path.join(refdir, "image_embeds.npy"), image_embeds.numpy())
    save_npy(os.path.join(refdir, "text_embeds.npy"), text_embeds.numpy())
    save_npy(os.path.join(refdir, "itm.npy"), itm.numpy())
    save_npy(os.path.join(refdir, "itm_logits.npy"), itm_logits.numpy())
    save_npy(os.path.join(refdir, "itc.npy"), itc.numpy())
    ref = {"photos": PHOTOS, "texts": TEXTS, "token_ids": tokens, "image_token_index": cfg.image_token_index,
           "num_query_tokens": nq, "image_size": size}
    with open(os.path.join(refdir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(f"{name}: itm {np.round(itm.numpy(), 4).tolist()} itc {np.round(itc.numpy(), 4).tolist()}")


def main():
    # The standalone projection models ignore part of the checkpoint, as they should.
    hf_logging.set_verbosity_error()
    for n in sys.argv[1:] or list(CONFIGS):
        build(n, CONFIGS[n])


if __name__ == "__main__":
    main()
