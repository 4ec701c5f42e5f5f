"""Writes a BLIP-2 checkpoint with random weights and the exact shapes of a real one, in
the Hugging Face layout transformers 5 saves (config.json, model.safetensors,
tokenizer.json, processor_config.json), for benchmarks: speed and memory do not depend on
the weight values, so these measure what the real models cost without downloading them.
The text they generate is meaningless.

    python scripts/random_checkpoint.py PRESET OUTDIR [--dtype float32|float16|bfloat16] [--seed 0]

Presets (vision encoder / Q-Former / language model):
    small       ViT-B/16 shapes / the real Q-Former / OPT-125m shapes: the CPU benchmark
                checkpoint of docs/PERFORMANCE.md (about 0.3 B parameters)
    opt-2.7b    Salesforce/blip2-opt-2.7b's shapes (ViT-g, Q-Former, OPT-2.7b)
    opt-6.7b    Salesforce/blip2-opt-6.7b's shapes
    flan-t5-xl  Salesforce/blip2-flan-t5-xl's shapes

The tokenizer is a small one trained on a fixed word list (scripts/make_fixtures.py's),
shaped like the real one (OPT: byte-level BPE with `</s>` as BOS; T5: Unigram); the
language model keeps the real vocabulary size, so the logits cost what they really cost.
Needs the packages of scripts/requirements-fixtures.txt.
"""
import argparse
import os
import sys

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import opt_tokenizer, t5_tokenizer  # noqa: E402  (the project's own tokenizers)

# The EVA ViT-g/14 vision encoder of every Salesforce BLIP-2 checkpoint.
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
# ViT-B/16, for a checkpoint small enough to benchmark on a laptop CPU.
VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6)


def qformer(vision):
    """The Q-Former of the Salesforce checkpoints, reading a vision encoder of this width."""
    return dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                cross_attention_frequency=2, encoder_hidden_size=vision["hidden_size"])


def opt(hidden, layers, heads, ffn):
    """An OPT decoder of these sizes, with the vocabulary and positions of the released ones."""
    return dict(model_type="opt", hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, ffn_dim=ffn, vocab_size=50304, max_position_embeddings=2048,
                do_layer_norm_before=True, activation_function="relu", bos_token_id=2, pad_token_id=1)


FLAN_T5_XL = dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24,
                  num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)

PRESETS = {
    "small": (VIT_B, opt(768, 12, 12, 3072)),
    "opt-2.7b": (VIT_G, opt(2560, 32, 32, 10240)),
    "opt-6.7b": (VIT_G, opt(4096, 32, 32, 16384)),
    "flan-t5-xl": (VIT_G, FLAN_T5_XL),
}
NUM_QUERY_TOKENS = 32


def make(preset, outdir, dtype, seed):
    vision, text = PRESETS[preset]
    text = dict(text)
    t5 = text["model_type"] == "t5"
    tok = t5_tokenizer() if t5 else opt_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": vision["image_size"], "width": vision["image_size"]})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=NUM_QUERY_TOKENS)
    if not t5:
        # OPT's eos is byte-level "\n", as in the released checkpoints' generation configs.
        text["eos_token_id"] = tok.convert_tokens_to_ids("\u010a")
    config = Blip2Config(vision_config=vision, qformer_config=qformer(vision), text_config=text,
                         num_query_tokens=NUM_QUERY_TOKENS, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        # Initialising billions of weights is much faster on a GPU, when there is one.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Blip2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    os.makedirs(outdir, exist_ok=True)
    model.save_pretrained(outdir, safe_serialization=True)
    processor.save_pretrained(outdir)
    return sum(p.numel() for p in model.parameters())


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("outdir")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    n = make(a.preset, a.outdir, a.dtype, a.seed)
    print(f"{a.outdir}: random {a.preset} checkpoint, {n / 1e9:.3f} B parameters, {a.dtype}")


if __name__ == "__main__":
    main(sys.argv[1:])
