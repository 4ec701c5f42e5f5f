"""Records what Hugging Face transformers' `generate()` produces for a toy language model, so
the Rust search module (crates/blip2-runtime/src/generation) can be checked token for token
without Python.

    /tmp/pyenv/bin/python scripts/make_generation_fixtures.py   # any env with torch + transformers 5.x

Writes tests/fixtures/generation/cases.json. Everything is seeded: running it again gives the
same file. Each case holds the generate() kwargs, the new tokens per prompt row (cut before the
first eos) and the number of forward calls (the prefill plus one per step, so the Rust test
also checks that the search stops when transformers' does). `kept_sets` holds, for a few
sampling settings, the tokens transformers' warpers leave at the first step.

The toy model is easy to rebuild exactly in Rust: the logits of the last position are
    A[x_t] + B[x_{t-1}] + C[p mod P]        (float32, added in that order)
where x_t is the last token, x_{t-1} the one before it (the B term is 0 when there is none or
the attention mask hides it), and p the number of attended tokens before x_t. The tables are
random float32 values, stored as the exact doubles of those floats so they round-trip.
It runs without a cache (use_cache=False): every step sees the whole sequence, so beam
reordering needs no cache and only the search itself decides the result.
"""
import json
import math
import os

import torch
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "generation")
VOCAB = 32
POSITIONS = 7
PAD = 0


class ToyConfig(PretrainedConfig):
    model_type = "toy-generation"

    def __init__(self, vocab_size=VOCAB, num_positions=POSITIONS, **kwargs):
        self.vocab_size = vocab_size
        self.num_positions = num_positions
        super().__init__(**kwargs)


class ToyLM(PreTrainedModel, GenerationMixin):
    config_class = ToyConfig
    main_input_name = "input_ids"

    def __init__(self, config, tables):
        super().__init__(config)
        self.A = torch.nn.Parameter(tables["A"], requires_grad=False)
        self.B = torch.nn.Parameter(tables["B"], requires_grad=False)
        self.C = torch.nn.Parameter(tables["C"], requires_grad=False)
        self.calls = 0

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        self.calls += 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.A[input_ids[:, -1]]
        if input_ids.shape[1] >= 2:
            prev_seen = (attention_mask[:, -2] == 1)[:, None]
            out = out + torch.where(prev_seen, self.B[input_ids[:, -2]], torch.zeros_like(out))
        else:
            out = out + torch.zeros_like(out)
        pos = attention_mask.sum(-1) - 1
        out = out + self.C[pos % self.config.num_positions]
        return CausalLMOutputWithPast(logits=out[:, None, :])


def make_tables(seed, a_scale, b_scale, c_scale, eos_bias):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(VOCAB, VOCAB, generator=g) * a_scale
    B = torch.randn(VOCAB, VOCAB, generator=g) * b_scale
    C = torch.randn(POSITIONS, VOCAB, generator=g) * c_scale
    for tok, bias in eos_bias.items():
        A[:, tok] += bias
    return {k: v.to(torch.float32).contiguous() for k, v in (("A", A), ("B", B), ("C", C))}


MODELS = {
    # plain: peaked enough that greedy and beams disagree now and then
    "plain": make_tables(1, 2.0, 1.0, 0.5, {}),
    # eos-heavy: tokens 2 and 3 are likely, so hypotheses finish at many different lengths
    "eosy": make_tables(2, 1.5, 1.0, 0.5, {2: 1.2, 3: 0.6}),
    # flat: small logits, so beam search keeps many near candidates alive
    "flat": make_tables(3, 0.6, 0.4, 0.2, {2: 0.4}),
    # stoppy: eos is often the best token, so the finished store fills early and beam search
    # stops on its early-stopping rules well before max_new_tokens
    "stoppy": make_tables(4, 1.5, 1.0, 0.5, {2: 2.5, 3: 1.0}),
}

# prompt sets: (ids, attention mask); left padding uses PAD with mask 0
PROMPTS = {
    "one": ([[5, 9, 14, 9]], None),
    "short": ([[17]], None),
    "batch2": ([[PAD, PAD, 4, 11, 6], [8, 1, 30, 2, 12]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
    "batch3": (
        [[PAD, PAD, PAD, 7, 19, 7], [PAD, 25, 3, 3, 21, 9], [13, 13, 26, 5, 31, 2]],
        [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
    ),
    # image-placeholder style prompt: a run of one id, as BLIP-2 feeds its query tokens
    "placeholders": ([[29] * 6 + [1, 10], [PAD, PAD] + [29] * 6], [[1] * 8, [0, 0] + [1] * 6]),
}


def model_for(name):
    return ToyLM(ToyConfig(), MODELS[name]).eval()


def new_tokens(seqs, prompt_len, eos, rows, nret):
    """Per input row, nret sequences of new ids, cut before the first eos (eos excluded)."""
    out = []
    for i in range(rows):
        group = []
        for j in range(nret):
            toks = seqs[i * nret + j, prompt_len:].tolist()
            for k, t in enumerate(toks):
                if t in eos:
                    toks = toks[:k]
                    break
            group.append(toks)
        out.append(group)
    return out


def run(model_name, prompt_name, cfg):
    model = model_for(model_name)
    ids, mask = PROMPTS[prompt_name]
    input_ids = torch.tensor(ids)
    attention_mask = torch.tensor(mask) if mask is not None else None
    kwargs = dict(cfg)
    kwargs.setdefault("use_cache", False)
    torch.manual_seed(0)
    seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    eos = cfg.get("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) else list(eos)
    nret = cfg.get("num_return_sequences", 1)
    return new_tokens(seqs, input_ids.shape[1], eos, len(ids), nret), model.calls


def case(cases, name, model_name, prompt_name, cfg):
    expected, calls = run(model_name, prompt_name, cfg)
    # forward_calls: the prefill plus one per decoding step, i.e. when the search stopped
    cases.append({"name": name, "model": model_name, "prompts": prompt_name, "config": cfg, "expected": expected,
                  "forward_calls": calls})


def kept_set(model_name, prompt_name, cfg):
    """The tokens that transformers' warpers leave finite at the first sampling step, per row, and
    the smallest probability among them (so the Rust test knows how many draws cover them all)."""
    model = model_for(model_name)
    ids, mask = PROMPTS[prompt_name]
    kwargs = dict(cfg, do_sample=True, max_new_tokens=1, use_cache=False, output_scores=True,
                  return_dict_in_generate=True)
    torch.manual_seed(0)
    res = model.generate(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask) if mask is not None else None, **kwargs)
    scores = res.scores[0]
    probs = torch.softmax(scores, dim=-1)
    rows = []
    for r in range(scores.shape[0]):
        keep = torch.isfinite(scores[r]).nonzero().flatten().tolist()
        rows.append({"tokens": keep, "min_prob": float(probs[r, keep].min())})
    return rows


def main():
    cases = []

    # --- greedy ---
    case(cases, "greedy_one_no_eos", "plain", "one", {"max_new_tokens": 10})
    case(cases, "greedy_default_length", "plain", "short", {})
    for m in ("plain", "eosy"):
        for p in ("batch2", "batch3", "placeholders"):
            case(cases, f"greedy_eos_{m}_{p}", m, p, {"max_new_tokens": 12, "eos_token_id": [2], "pad_token_id": PAD})
    case(cases, "greedy_two_eos", "eosy", "batch3", {"max_new_tokens": 12, "eos_token_id": [3, 2], "pad_token_id": PAD})
    case(cases, "greedy_eos_no_pad", "eosy", "batch3", {"max_new_tokens": 9, "eos_token_id": 2})
    for rp in (1.4, 0.6):
        for p in ("one", "batch3", "placeholders"):
            case(cases, f"greedy_rep{rp}_{p}", "plain", p,
                 {"max_new_tokens": 14, "repetition_penalty": rp, "eos_token_id": [2], "pad_token_id": PAD})
    for n in (1, 2, 3):
        for p in ("one", "batch2", "placeholders"):
            case(cases, f"greedy_ngram{n}_{p}", "plain", p, {"max_new_tokens": 14 if n > 1 else 9, "no_repeat_ngram_size": n})
    for mn in (3, 8):
        case(cases, f"greedy_min_new{mn}", "eosy", "batch3",
             {"max_new_tokens": 10, "min_new_tokens": mn, "eos_token_id": [2, 3], "pad_token_id": PAD})
    case(cases, "greedy_all_processors", "eosy", "batch2",
         {"max_new_tokens": 15, "min_new_tokens": 4, "repetition_penalty": 1.2, "no_repeat_ngram_size": 2,
          "eos_token_id": [2], "pad_token_id": PAD})

    # --- sampling that is deterministic: top_k=1 leaves one token, so torch's RNG does not matter ---
    case(cases, "sample_topk1_expand", "eosy", "batch2",
         {"max_new_tokens": 8, "do_sample": True, "top_k": 1, "num_return_sequences": 3,
          "eos_token_id": [2], "pad_token_id": PAD, "repetition_penalty": 1.1})
    case(cases, "sample_topp_tiny", "plain", "batch3",
         {"max_new_tokens": 8, "do_sample": True, "top_p": 0.01, "temperature": 0.5, "eos_token_id": [2], "pad_token_id": PAD})

    # --- beam search ---
    for m in ("plain", "eosy", "flat"):
        for nb in (2, 3, 4):
            for lp in (0.5, 1.0, 2.0, -1.0):
                for es in (False, True, "never"):
                    for p in ("batch2", "batch3") if m == "eosy" else ("batch2",):
                        nret = 1 + (nb + int(lp * 2) + (3 if es == "never" else int(es))) % nb
                        case(cases, f"beam_{m}_{p}_nb{nb}_lp{lp}_es{es}", m, p,
                             {"max_new_tokens": 9, "num_beams": nb, "length_penalty": lp, "early_stopping": es,
                              "num_return_sequences": nret, "eos_token_id": [2], "pad_token_id": PAD})
    for nb in (2, 3, 4):
        for lp in (0.5, 1.0, 2.0, -0.5):
            for es in (False, True, "never"):
                case(cases, f"beam_stoppy_nb{nb}_lp{lp}_es{es}", "stoppy", "batch3",
                     {"max_new_tokens": 20, "num_beams": nb, "length_penalty": lp, "early_stopping": es,
                      "num_return_sequences": 1 + (nb + 1) % nb, "eos_token_id": [2, 3], "pad_token_id": PAD})
    case(cases, "beam_no_eos", "plain", "one", {"max_new_tokens": 7, "num_beams": 3, "num_return_sequences": 3})
    case(cases, "beam_default_length", "flat", "short", {"num_beams": 3, "eos_token_id": [2]})
    case(cases, "beam_two_eos", "eosy", "batch3",
         {"max_new_tokens": 10, "num_beams": 3, "num_return_sequences": 2, "eos_token_id": [2, 3], "pad_token_id": PAD})
    case(cases, "beam_lp0_never", "eosy", "batch3",
         {"max_new_tokens": 10, "num_beams": 4, "length_penalty": 0.0, "early_stopping": "never",
          "num_return_sequences": 4, "eos_token_id": [2], "pad_token_id": PAD})
    for rp in (1.5, 0.8):
        case(cases, f"beam_rep{rp}", "eosy", "placeholders",
             {"max_new_tokens": 12, "num_beams": 3, "repetition_penalty": rp, "num_return_sequences": 2,
              "eos_token_id": [2], "pad_token_id": PAD})
    for n in (2, 3):
        case(cases, f"beam_ngram{n}", "plain", "batch2",
             {"max_new_tokens": 14, "num_beams": 4, "no_repeat_ngram_size": n, "num_return_sequences": 3,
              "eos_token_id": [2], "pad_token_id": PAD})
    case(cases, "beam_min_new", "eosy", "batch3",
         {"max_new_tokens": 10, "num_beams": 3, "min_new_tokens": 5, "num_return_sequences": 3,
          "eos_token_id": [2, 3], "pad_token_id": PAD})
    case(cases, "beam_long", "flat", "batch3",
         {"max_new_tokens": 30, "num_beams": 4, "length_penalty": 1.3, "num_return_sequences": 2,
          "eos_token_id": [2], "pad_token_id": PAD})

    # --- sampling warpers: which tokens survive temperature / top_k / top_p (transformers' order) ---
    kept = []
    for m, p, cfg in (
        ("plain", "batch3", {"top_k": 4}),
        ("plain", "batch3", {"top_k": 0, "top_p": 0.6}),
        ("flat", "batch2", {"top_k": 0, "top_p": 0.3, "temperature": 1.5}),
        ("eosy", "batch2", {"top_k": 6, "top_p": 0.8, "temperature": 0.7}),
        ("flat", "one", {"top_k": 9, "top_p": 0.5, "temperature": 2.0}),
        ("eosy", "placeholders", {"top_k": 5, "repetition_penalty": 1.8, "no_repeat_ngram_size": 2}),
    ):
        kept.append({"model": m, "prompts": p, "config": cfg, "rows": kept_set(m, p, cfg)})

    doc = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "vocab": VOCAB,
        "positions": POSITIONS,
        "models": {k: {n: t.tolist() for n, t in v.items()} for k, v in MODELS.items()},
        "prompts": {k: {"ids": v[0], "attention_mask": v[1]} for k, v in PROMPTS.items()},
        "cases": cases,
        "kept_sets": kept,
    }
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "cases.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    ended = sum(1 for c in cases for g in c["expected"] for s in g
                if len(s) < c["config"].get("max_new_tokens", 20))
    print(f"wrote {path}: {len(cases)} cases, {ended} sequences ended before max_new_tokens, "
          f"{os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
