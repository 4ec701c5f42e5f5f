"""Makes the tiny random BLIP-2 checkpoints under tests/fixtures/ and records what
Hugging Face transformers computes for them, so the Rust tests and CI need no Python.

    python -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt
    .venv/bin/python scripts/make_fixtures.py

Everything is seeded: running it again gives the same files. For each checkpoint it
writes
  tests/fixtures/NAME/checkpoint/   the Hugging Face folder (config, weights, tokenizer)
  tests/fixtures/NAME/reference/    transformers' outputs:
      graphs.json + *.npy   inputs and outputs of each stage (vision, Q-Former, LM
                            prefill and two cached decode steps)
      generate.json         generate() results for every task, token ids included
      pixels/*.npy          the processor's pixel values for each test photo
and tests/fixtures/preprocess/ holds pixel values at other sizes and for other modes.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, PreTrainedTokenizerFast
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
PHOTOS = os.path.join(ROOT, "tests", "data", "photos")

WORDS = ("a photo of the cat dog man woman car street sky red blue small large sitting standing "
         "on in at near with question what is answer where how many there are two one picture rocket "
         "camera black white grey launch").split()


def corpus():
    for i in range(3000):
        yield " ".join(WORDS[(i * k + i // 7) % len(WORDS)] for k in (1, 3, 7, 11, 13, 17)) + "\n"


def opt_tokenizer():
    """A byte-level BPE shaped like OPT's: `</s>` (id 2) is BOS and is prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def t5_tokenizer():
    """A Unigram tokenizer shaped like T5's: `</s>` (id 1) is appended, `<pad>` (id 0) starts the decoder."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


# Checkpoint configurations that differ wherever the exporter has a branch.
CONFIGS = {
    # Old Hub layout: sharded weights, flat preprocessor_config.json, lm_head stored.
    "opt-tiny-sharded": dict(
        layout="sharded",
        image_size=32,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, qkv_bias=True, layer_norm_eps=1e-6),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                     cross_attention_frequency=2, encoder_hidden_size=32, layer_norm_eps=1e-12),
        text=dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                  vocab_size=608, max_position_embeddings=128, word_embed_proj_dim=32,
                  do_layer_norm_before=True, activation_function="relu", bos_token_id=2, pad_token_id=1,
                  init_std=0.25),
        num_query_tokens=8),
    # transformers 5 layout: one model.safetensors, nested processor_config.json, no qkv bias,
    # post-layer-norm OPT (do_layer_norm_before=False, as in opt-350m).
    "opt-tiny": dict(
        layout="v5",
        image_size=28,
        vision=dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                    image_size=28, patch_size=7, qkv_bias=False, layer_norm_eps=1e-5),
        qformer=dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=4, intermediate_size=56,
                     cross_attention_frequency=1, encoder_hidden_size=48, layer_norm_eps=1e-12),
        text=dict(model_type="opt", hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=96,
                  vocab_size=616, max_position_embeddings=128, word_embed_proj_dim=64,
                  do_layer_norm_before=False, activation_function="relu", bos_token_id=2, pad_token_id=1,
                  init_std=0.25),
        num_query_tokens=6),
    # Flan-T5 shaped: gated-gelu, untied lm_head stored apart (as on the Hub), encoder and
    # decoder depths differ (transformers 5.24 sizes the generation cache from num_layers,
    # so the decoder must not be the deeper one), heads * d_kv != d_model with a head size ONNX Runtime's CUDA
    # DecoderMaskedMultiHeadAttention has (32, 64, 128), few relative-position buckets so the
    # logarithmic buckets are reached by short prompts.
    "t5-tiny": dict(
        layout="v5",
        image_size=24,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=24, patch_size=8, qkv_bias=True, layer_norm_eps=1e-6),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                     cross_attention_frequency=1, encoder_hidden_size=32, layer_norm_eps=1e-12),
        text=dict(model_type="t5", d_model=32, d_ff=40, d_kv=32, num_layers=3, num_decoder_layers=2, num_heads=4,
                  vocab_size=84, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                  eos_token_id=1, pad_token_id=0, init_std=0.25),
        num_query_tokens=6),
}


def save_npy(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.ascontiguousarray(arr))


def to_old_layout(ckdir, n_vision_layers):
    """Rewrites a transformers 5 save into the layout of the checkpoints on the Hub: two shards
    with an index, the tied lm_head stored, the older processor files."""
    sd = load_file(os.path.join(ckdir, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        out[k] = v
    out["language_model.lm_head.weight"] = out["language_model.model.decoder.embed_tokens.weight"].clone()
    names = sorted(out)
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    index = {"metadata": {"total_size": int(sum(t.numel() * t.element_size() for t in out.values()))},
             "weight_map": {}}
    os.remove(os.path.join(ckdir, "model.safetensors"))
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: out[k].contiguous() for k in keys}, os.path.join(ckdir, fname), metadata={"format": "pt"})
        for k in keys:
            index["weight_map"][k] = fname
    with open(os.path.join(ckdir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    # Flat preprocessor_config.json; processor_config.json holds only num_query_tokens.
    with open(os.path.join(ckdir, "processor_config.json")) as f:
        pc = json.load(f)
    ip = pc.pop("image_processor")
    ip["processor_class"] = "Blip2Processor"
    with open(os.path.join(ckdir, "preprocessor_config.json"), "w") as f:
        json.dump(ip, f, indent=2)
    with open(os.path.join(ckdir, "processor_config.json"), "w") as f:
        json.dump({"num_query_tokens": pc["num_query_tokens"], "processor_class": "Blip2Processor"}, f, indent=2)


def make_rgba_photo():
    """A real photo with a transparent gradient, for the alpha-compositing path."""
    img = Image.open(os.path.join(PHOTOS, "chelsea.png")).convert("RGB").crop((100, 20, 260, 140))
    alpha = np.tile(np.linspace(0, 255, img.width, dtype=np.float32)[None, :], (img.height, 1)).astype(np.uint8)
    rgba = np.dstack([np.asarray(img), alpha])
    Image.fromarray(rgba, "RGBA").save(os.path.join(PHOTOS, "chelsea_rgba.png"))


def load_image(name):
    return Image.open(os.path.join(PHOTOS, name))


def new_tokens(out, prompt_len):
    return [row[prompt_len:].tolist() for row in out]


def strip_eos(ids, eos, pad):
    res = []
    for t in ids:
        if t == eos:
            break
        res.append(t)
    # After an eos transformers pads finished rows with pad; the loop above stops at eos.
    return res


def build(name, spec):
    torch.manual_seed(1234)
    base = os.path.join(FIX, name)
    ckdir = os.path.join(base, "checkpoint")
    refdir = os.path.join(base, "reference")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(ckdir)
    t5 = spec["text"]["model_type"] == "t5"
    tok = t5_tokenizer() if t5 else opt_tokenizer()
    size = spec["image_size"]
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
                               tokenizer=tok, num_query_tokens=spec["num_query_tokens"])
    image_token = tok.convert_tokens_to_ids("<image>")
    text = dict(spec["text"])
    init_std = text.pop("init_std")
    if not t5:
        text["eos_token_id"] = tok.convert_tokens_to_ids("\u010a")
        text["init_std"] = init_std
    cfg = Blip2Config(vision_config=spec["vision"], qformer_config=spec["qformer"], text_config=text,
                      num_query_tokens=spec["num_query_tokens"], image_token_index=image_token,
                      initializer_range=0.02)
    model = Blip2ForConditionalGeneration(cfg).eval()
    # Random init leaves the LM's logits nearly flat; widen them so greedy choices have clear margins.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3 if "embed" in n or n == "query_tokens" else 0.15)

    photos = ["chelsea.png", "rocket.jpg", "camera.png", "chelsea_rgba.png", "no_time_for_that_tiny.gif"]
    # Save and reload first, so every output below comes from the weights on disk.
    model.save_pretrained(ckdir, safe_serialization=True)
    if t5:
        add_untied_t5_head(ckdir)
    model = Blip2ForConditionalGeneration.from_pretrained(ckdir).eval()
    # Generated sequences start after the prompt (OPT) or after decoder_start_token_id (T5).
    skip = (lambda enc: 1) if t5 else (lambda enc: enc["input_ids"].shape[1])
    # Make the model stop sometimes: its eos becomes a token it tends to produce.
    probe = processor(images=load_image("chelsea.png"), text="", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**probe, max_new_tokens=12, do_sample=False)
    produced = out[0, skip(probe):].tolist()
    # The first token that appears only after a few steps, so captions end mid-way.
    eos = next((t for i, t in enumerate(produced) if i >= 4 and t not in produced[:i]), produced[-1])
    model.generation_config.eos_token_id = eos
    if t5:
        model.generation_config.pad_token_id = 0
        model.generation_config.decoder_start_token_id = 0
    else:
        model.generation_config.pad_token_id = 1
        model.generation_config.bos_token_id = 2
    model.generation_config.save_pretrained(ckdir)
    # transformers 5 generates with the language model's own generation config, which it
    # derives from text_config: keep both files in agreement, as the Hub checkpoints do.
    model.config.text_config.eos_token_id = eos
    model.config.save_pretrained(ckdir)
    processor.save_pretrained(ckdir)
    if spec["layout"] == "sharded":
        to_old_layout(ckdir, spec["vision"]["num_hidden_layers"])
    model = Blip2ForConditionalGeneration.from_pretrained(ckdir).eval()
    processor = Blip2Processor.from_pretrained(ckdir)
    # BLIP-2 must be left-padded for batched generation (right padding makes the last
    # position a pad for short rows); blip2-ort always left-pads.
    processor.tokenizer.padding_side = "left"
    assert model.generation_config.eos_token_id == eos
    check = processor(images=load_image("chelsea.png"), text="", return_tensors="pt")
    with torch.no_grad():
        again = model.generate(**check, max_new_tokens=12, do_sample=False)[0, skip(check):].tolist()
    # The reloaded model must reproduce the probe up to the chosen eos.
    assert again == produced[: produced.index(eos) + 1], (again, produced, eos)

    # --- pixel values for every photo -------------------------------------------------
    for p in photos:
        px = processor(images=load_image(p), return_tensors="np")["pixel_values"]
        save_npy(os.path.join(refdir, "pixels", os.path.splitext(p)[0] + ".npy"), px[0].astype(np.float32))

    # --- stage by stage ---------------------------------------------------------------
    graphs = {}
    with torch.no_grad():
        enc = processor(images=[load_image("chelsea.png"), load_image("rocket.jpg")],
                        text=["a photo of", "a photo of"], return_tensors="pt")
        pix = enc["pixel_values"]
        feats = model.vision_model(pix).last_hidden_state
        q = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats,
                          encoder_attention_mask=torch.ones(feats.shape[:-1], dtype=torch.long)).last_hidden_state
        img_embeds = model.language_projection(q)
        save_npy(os.path.join(refdir, "pixel_values.npy"), pix.numpy())
        save_npy(os.path.join(refdir, "image_features.npy"), feats.numpy())
        save_npy(os.path.join(refdir, "image_embeds.npy"), img_embeds.numpy())
        if t5:
            graphs = t5_stages(model, enc, img_embeds, image_token, refdir)
        else:
            graphs = opt_stages(model, enc, img_embeds, image_token, refdir)
        graphs["image_token_id"] = image_token
        graphs["photos"] = ["chelsea.png", "rocket.jpg"]
    with open(os.path.join(refdir, "graphs.json"), "w") as f:
        json.dump(graphs, f, indent=1)
    generate_cases(name, model, processor, tok, eos, skip, refdir)


def opt_stages(model, enc, img_embeds, image_token, refdir):
    """LM prefill on the first image, then two cached decode steps and a third one fed the
    image token (a generated or sampled token like any other: generate() embeds it)."""
    graphs = {}
    ids = enc["input_ids"][:1]
    mask = enc["attention_mask"][:1]
    emb = model.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == image_token).unsqueeze(-1), img_embeds[:1])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    o = model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True)
    steps = [{"input_ids": ids[0].tolist(), "attention_mask": mask[0].tolist(), "position_ids": pos[0].tolist(),
              "logits": "prefill_logits.npy"}]
    save_npy(os.path.join(refdir, "prefill_logits.npy"), o.logits.numpy())
    past = o.past_key_values
    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
    for s in range(3):
        if s == 2:
            nxt = torch.tensor([[image_token]])
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = torch.tensor([[mask.shape[1] - 1]])
        o = model.language_model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True)
        past = o.past_key_values
        fname = f"decode{s + 1}_logits.npy"
        save_npy(os.path.join(refdir, fname), o.logits.numpy())
        steps.append({"input_ids": nxt[0].tolist(), "attention_mask": mask[0].tolist(),
                      "position_ids": pos[0].tolist(), "logits": fname})
        nxt = o.logits[:, -1].argmax(-1, keepdim=True)
    graphs["lm_steps"] = steps
    return graphs


def t5_stages(model, enc, img_embeds, image_token, refdir):
    """Encoder on the first image's prompt, then the decoder from decoder_start_token_id
    and two cached steps."""
    lm = model.language_model
    ids = enc["input_ids"][:1]
    mask = enc["attention_mask"][:1]
    emb = model.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == image_token).unsqueeze(-1), img_embeds[:1])
    enc_out = lm.encoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    save_npy(os.path.join(refdir, "encoder_hidden_states.npy"), enc_out.numpy())
    start = lm.config.decoder_start_token_id
    nxt = torch.tensor([[start]])
    past = None
    steps = []
    for s in range(3):
        o = lm(encoder_outputs=(enc_out,), attention_mask=mask, decoder_input_ids=nxt, past_key_values=past,
               use_cache=True)
        past = o.past_key_values
        fname = f"decoder{s}_logits.npy"
        save_npy(os.path.join(refdir, fname), o.logits.numpy())
        steps.append({"decoder_input_ids": nxt[0].tolist(), "logits": fname})
        nxt = o.logits[:, -1].argmax(-1, keepdim=True)
    return {"input_ids": ids[0].tolist(), "attention_mask": mask[0].tolist(),
            "encoder_hidden_states": "encoder_hidden_states.npy", "decoder_steps": steps}


def add_untied_t5_head(ckdir):
    """transformers 5 saves T5 with lm_head tied to `shared`; the Flan-T5 checkpoints on the
    Hub store their own lm_head (and copies of the embeddings). Write it that way."""
    path = os.path.join(ckdir, "model.safetensors")
    sd = load_file(path)
    shared = sd["language_model.shared.weight"]
    g = torch.Generator().manual_seed(99)
    sd["language_model.lm_head.weight"] = torch.randn(shared.shape, generator=g) * 0.15
    sd["language_model.encoder.embed_tokens.weight"] = shared.clone()
    sd["language_model.decoder.embed_tokens.weight"] = shared.clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})


def generate_cases(name, model, processor, tok, eos, skip, refdir):
    """generate() for every task."""
    cases = []

    def run(case_name, task, images, prompts, **kw):
        enc = processor(images=[load_image(i) for i in images], text=prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            res = model.generate(**enc, **kw, output_scores=True, return_dict_in_generate=True)
        out = res.sequences
        if not kw.get("num_beams", 1) > 1:
            # Token-for-token tests need clear winners: report the closest top-2 gap.
            gap = min(float((s.topk(2).values[:, 0] - s.topk(2).values[:, 1]).min()) for s in res.scores)
            if gap < 1e-3:
                print(f"warning: {name}/{case_name}: top-2 logit gap {gap:.2e}")
        seqs = [strip_eos(r, eos, 1) for r in new_tokens(out, skip(enc))]
        texts = [tok.decode(s, skip_special_tokens=True).strip() for s in seqs]
        cases.append(dict(name=case_name, task=task, images=images, prompts=prompts, generate=kw,
                          input_ids=enc["input_ids"].tolist(), attention_mask=enc["attention_mask"].tolist(),
                          sequences=seqs, texts=texts))
        return texts

    mx = dict(max_new_tokens=10)
    run("caption", "caption", ["chelsea.png"], [""], **mx)
    run("caption_rgba", "caption", ["chelsea_rgba.png"], [""], **mx)
    run("caption_gray", "caption", ["camera.png"], [""], **mx)
    run("caption_gif", "caption", ["no_time_for_that_tiny.gif"], [""], **mx)
    run("prompted_caption", "caption", ["rocket.jpg"], ["a photo of"], **mx)
    run("vqa", "vqa", ["camera.png"], ["Question: what is in the picture? Answer:"], **mx)
    q1, q2 = "what is this?", "where is it?"
    a1 = run("chat_turn1", "chat", ["chelsea.png"], [f"Question: {q1} Answer:"], **mx)[0]
    run("chat_turn2", "chat", ["chelsea.png"], [f"Question: {q1} Answer: {a1}. Question: {q2} Answer:"], **mx)
    run("beam", "caption", ["chelsea.png"], ["a photo of"], max_new_tokens=10, num_beams=3, length_penalty=0.5,
        num_return_sequences=2)
    run("beam_long", "caption", ["rocket.jpg"], [""], max_new_tokens=8, num_beams=4, length_penalty=2.0)
    run("repetition", "caption", ["rocket.jpg"], [""], max_new_tokens=12, repetition_penalty=1.5,
        no_repeat_ngram_size=2)
    run("min_new_tokens", "caption", ["chelsea.png"], [""], max_new_tokens=12, min_new_tokens=9)
    run("batch", "batch", ["chelsea.png", "rocket.jpg", "no_time_for_that_tiny.gif"],
        ["", "a photo of the", "Question: what is in the picture? Answer:"], **mx)
    # Each batch row alone, the reference for batch == single.
    for i, (im, pr) in enumerate([("chelsea.png", ""), ("rocket.jpg", "a photo of the"),
                                  ("no_time_for_that_tiny.gif", "Question: what is in the picture? Answer:")]):
        run(f"batch_row{i}", "caption", [im], [pr], **mx)
    with open(os.path.join(refdir, "generate.json"), "w") as f:
        json.dump({"eos_token_id": eos, "cases": cases}, f, indent=1)
    print(f"{name}: eos {eos}; " + "; ".join(f"{c['name']}: {c['texts']}" for c in cases))


def preprocess_fixtures():
    """Pixel values at the real BLIP-2 size and an odd one, for several image modes."""
    out = os.path.join(FIX, "preprocess")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cases = []
    for size in (224, 61):
        ip = BlipImageProcessorPil(size={"height": size, "width": size})
        for p in ["chelsea.png", "camera.png", "chelsea_rgba.png", "no_time_for_that_tiny.gif", "rocket.jpg"]:
            px = ip(Image.open(os.path.join(PHOTOS, p)), return_tensors="np")["pixel_values"][0]
            fname = f"{os.path.splitext(p)[0]}_{size}.npy"
            save_npy(os.path.join(out, fname), px.astype(np.float32))
            cases.append({"photo": p, "size": size, "pixels": fname})
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({"image_mean": list(BlipImageProcessorPil().image_mean),
                   "image_std": list(BlipImageProcessorPil().image_std), "cases": cases}, f, indent=1)


def main():
    torch.manual_seed(0)
    make_rgba_photo()
    names = sys.argv[1:] or list(CONFIGS)
    for n in names:
        build(n, CONFIGS[n])
    preprocess_fixtures()


if __name__ == "__main__":
    main()
