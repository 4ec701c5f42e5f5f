"""The transformers side of `scripts/compare_bench.sh`: times Hugging Face transformers'
BLIP-2 `generate()` on a checkpoint folder the way `blip2-ort bench` times an export, and
prints one JSON object whose keys are the ones `blip2-ort bench --json` prints.

    python scripts/hf_generate_bench.py CHECKPOINT [--batch 1,4] [--new-tokens 20]
        [--prompt-tokens 0] [--beams 1] [--reps 3] [--threads N] [--device cpu|cuda]
        [--dtype float32|float16|bfloat16]

What is timed, per batch size B: one `generate()` call on B images of standard-normal
pixel values with the prompt `num_query_tokens` image tokens, BOS (when the language model
has one), then --prompt-tokens ids 10, 11, ...; `min_new_tokens = max_new_tokens =
--new-tokens`, so every call makes exactly that many tokens whatever the weights. Each
number is the median of --reps calls after one untimed warm-up call.

Keys: generate_b{B}_ms, images_per_s_b{B}, vision_b1_ms (the vision encoder alone),
ttft_b1_ms (a generate() of one token at batch 1), decode_ms_per_token_b1 ((generate of
N tokens - generate of 1 token) / (N - 1)), peak_rss_MB (the process's peak resident
memory), peak_gpu_mem_MB on CUDA (torch's allocator peak), and the settings used. Needs
the packages of scripts/requirements-fixtures.txt.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch
from transformers import Blip2ForConditionalGeneration


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a Hugging Face BLIP-2 checkpoint folder (or Hub id)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=0, help="text tokens after BOS")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    a = p.parse_args(argv)
    a.batch = [int(b) for b in a.batch.split(",") if b.strip()]
    if not a.batch or min(a.batch) < 1:
        p.error("--batch: batch sizes must be at least 1")
    if a.new_tokens < 1 or a.reps < 1 or a.beams < 1 or a.prompt_tokens < 0 or a.threads < 0:
        p.error("--new-tokens, --reps and --beams must be at least 1; --prompt-tokens and --threads at least 0")
    return a


class Bench:
    def __init__(self, a):
        self.a = a
        self.device = torch.device(a.device)
        self.model = Blip2ForConditionalGeneration.from_pretrained(a.checkpoint, dtype=getattr(torch, a.dtype))
        self.model = self.model.to(self.device).eval()
        cfg = self.model.config
        self.size = cfg.vision_config.image_size
        self.prompt = [cfg.image_token_index] * cfg.num_query_tokens
        bos = getattr(cfg.text_config, "bos_token_id", None)
        if bos is not None and cfg.text_config.model_type != "t5":
            self.prompt.append(bos)
        self.prompt += list(range(10, 10 + a.prompt_tokens))
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def pixels(self, b):
        px = torch.randn(b, 3, self.size, self.size, generator=self.gen)
        return px.to(self.device, self.model.dtype)

    def median_ms(self, fn):
        """Median wall time of fn over --reps calls, after one warm-up call."""
        fn()
        self.sync()
        times = []
        for _ in range(self.a.reps):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000.0, 2)

    def generate_ms(self, b, tokens):
        px = self.pixels(b)
        ids = torch.tensor([self.prompt] * b, device=self.device)
        mask = torch.ones_like(ids)

        def call():
            self.model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, do_sample=False,
                                num_beams=self.a.beams, max_new_tokens=tokens, min_new_tokens=tokens)

        return self.median_ms(call)

    def run(self):
        a = self.a
        out = {"checkpoint": a.checkpoint, "device": a.device, "dtype": a.dtype,
               "threads": torch.get_num_threads(), "new_tokens": a.new_tokens,
               "prompt_tokens": a.prompt_tokens, "beams": a.beams}
        px1 = self.pixels(1)
        out["vision_b1_ms"] = self.median_ms(lambda: self.model.vision_model(pixel_values=px1))
        for b in a.batch:
            ms = self.generate_ms(b, a.new_tokens)
            out[f"generate_b{b}_ms"] = ms
            out[f"images_per_s_b{b}"] = round(b * 1000.0 / ms, 2)
        # Time to first token: image in, one new token out (what blip2-ort bench calls it).
        one = self.generate_ms(1, 1)
        out["ttft_b1_ms"] = one
        if a.new_tokens > 1:
            full = out.get("generate_b1_ms") or self.generate_ms(1, a.new_tokens)
            out["decode_ms_per_token_b1"] = round((full - one) / (a.new_tokens - 1), 3)
        if self.device.type == "cuda":
            out["peak_gpu_mem_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # ru_maxrss is in KiB on Linux.
        out["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
        return out


def main(argv):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        result = Bench(a).run()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
