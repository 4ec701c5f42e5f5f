"""Where an export's time goes, graph by graph and operator by operator, on ONNX Runtime's
CPU provider: the vision encoder and Q-Former on one image, and (OPT exports) the
language model's prefill of a caption prompt and one decode step at batch 1 and 4. Each
graph is timed without profiling (median of --reps runs after warm-up), then run again
under ONNX Runtime's profiler for each operator type's share of the kernel time.

    python scripts/profile_graphs.py EXPORT [--threads 2] [--reps 10] [--past 40]
    python scripts/profile_graphs.py --kernels [--threads 2]

--kernels times single matrix products at the shapes of the small benchmark checkpoint
instead (fp32 MatMul, DynamicQuantizeMatMul, MatMulNBits with 4- and 8-bit weights at
accuracy levels 0 and 4: the choice the exporter's quantization options make; and int8
activations quantized row by row in standard operators around MatMulInteger, as
`--quantize-lm-activations int8` exports them).

Needs onnxruntime (the version blip2-ort runs, 1.31.1) and onnx from pip. The graphs run
on random inputs; their values do not change the work.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def options(threads, profile_dir=None):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # blip2-ort's CPU profile runs without ONNX Runtime's arena.
    o.enable_cpu_mem_arena = False
    if profile_dir:
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(profile_dir, "profile")
    return o


def median_ms(session, feeds, reps):
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def op_shares(path, feeds, threads, reps):
    with tempfile.TemporaryDirectory() as d:
        s = ort.InferenceSession(path, options(threads, d), providers=["CPUExecutionProvider"])
        for _ in range(reps):
            s.run(None, feeds)
        with open(s.end_profiling()) as f:
            events = json.load(f)
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values()) or 1
    return [(op, 100.0 * us / total) for op, us in by_op.most_common()]


def profile(name, path, feeds, args, rows):
    s = ort.InferenceSession(path, options(args.threads), providers=["CPUExecutionProvider"])
    ms = median_ms(s, feeds, args.reps)
    shares = op_shares(path, feeds, args.threads, max(3, args.reps // 2))
    top = ", ".join(f"{op} {p:.0f}%" for op, p in shares[:6] if p >= 1.0)
    rows.append((name, ms, top))
    print(f"{name}: {ms:.2f} ms  ({top})", file=sys.stderr, flush=True)
    return s


def graphs(args):
    with open(os.path.join(args.export, "blip2_manifest.json")) as f:
        m = json.load(f)
    g = {k: os.path.join(args.export, v["file"]) for k, v in m["graphs"].items() if v}
    rng = np.random.default_rng(0)
    size = m["image"]["height"]
    rows = []
    px = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    vision = profile("vision encoder, 1 image", g["vision_encoder"], {"pixel_values": px}, args, rows)
    feats = vision.run(None, {"pixel_values": px})[0].astype(np.float32)
    profile("Q-Former, 1 image", g["qformer"], {"image_features": feats}, args, rows)
    if m["family"] != "opt":
        print("(the language model is profiled for OPT exports only)", file=sys.stderr)
        return m, rows
    t = m["text"]
    q = m["num_query_tokens"]
    image_token, bos = m["tokens"]["image_token_id"], m["tokens"]["bos_token_id"]
    lm = g["language_model"]
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3
    probe = ort.InferenceSession(lm, quiet, providers=["CPUExecutionProvider"])
    # logits_to_keep is an input with a default (an initializer ONNX Runtime lets a caller
    # override), which get_inputs() leaves out; blip2-ort feeds 1 at the prefill.
    names = [i.name for i in probe.get_inputs()] + [i.name for i in probe.get_overridable_initializers()]
    pasts = [n for n in names if n.startswith("past_key_values.")]

    def past(b, length):
        return {n: rng.standard_normal((b, t["num_heads"], length, t["head_dim"]), dtype=np.float32)
                for n in pasts}

    for b in (1, 4):
        # A caption prompt: the image tokens, then BOS, as transformers builds it.
        ids = np.array([[image_token] * q + [bos]] * b, dtype=np.int64)
        n = ids.shape[1]
        feeds = {"input_ids": ids,
                 "image_embeds": rng.standard_normal((b, q, t["hidden_size"]), dtype=np.float32),
                 "attention_mask": np.ones((b, n), np.int64),
                 "position_ids": np.tile(np.arange(n, dtype=np.int64), (b, 1)), **past(b, 0)}
        if "logits_to_keep" in names:
            feeds["logits_to_keep"] = np.array(1, np.int64)
        profile(f"language model prefill, batch {b} ({n} positions)", lm, feeds, args, rows)
        feeds = {"input_ids": np.full((b, 1), 10, np.int64),
                 "image_embeds": np.zeros((b, 0, t["hidden_size"]), np.float32),
                 "attention_mask": np.ones((b, args.past + 1), np.int64),
                 "position_ids": np.full((b, 1), args.past, np.int64), **past(b, args.past)}
        profile(f"language model decode step, batch {b} ({args.past} past)", lm, feeds, args, rows)
    return m, rows


def kernels(args):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def model(nodes, inits, k, n, opset=17):
        nodes = nodes if isinstance(nodes, list) else [nodes]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 9
        return m.SerializeToString()

    def fp32(k, n):
        w = rng.standard_normal((k, n), dtype=np.float32)
        return model(helper.make_node("MatMul", ["x", "w"], ["y"]), [numpy_helper.from_array(w, "w")], k, n)

    def dynamic_int8(k, n):
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        s = np.full(n, 0.01, np.float32)
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
        return model(node, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")], k, n)

    def per_row_int8(k, n):
        # Each row quantized with its own scale (max |x| / 127, zero point 128, as uint8),
        # MatMulInteger against int8 weights, then the row and column scales: activations
        # in int8 whose result does not depend on the other rows, from standard operators.
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        consts = {"axis": np.array([1], np.int64), "eps": np.array(1e-8, np.float32),
                  "c127": np.array(127, np.float32), "c128": np.array(128.5, np.float32),
                  "zp": np.array(128, np.uint8), "cs": np.full(n, 0.01, np.float32)}
        nodes = [helper.make_node("Abs", ["x"], ["a"]),
                 helper.make_node("ReduceMax", ["a", "axis"], ["m"], keepdims=1),
                 helper.make_node("Max", ["m", "eps"], ["m2"]),
                 helper.make_node("Div", ["m2", "c127"], ["s"]),
                 helper.make_node("Div", ["x", "s"], ["xs"]),
                 helper.make_node("Add", ["xs", "c128"], ["xo"]),  # rounds, as the Cast truncates
                 helper.make_node("Cast", ["xo"], ["xq"], to=TensorProto.UINT8),
                 helper.make_node("MatMulInteger", ["xq", "w", "zp"], ["yi"]),
                 helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["s", "cs"], ["sc"]),
                 helper.make_node("Mul", ["yf", "sc"], ["y"])]
        inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(v, k_) for k_, v in consts.items()]
        return model(nodes, inits, k, n, opset=18)

    def nbits(bits, level):
        def make(k, n, block=32):
            blocks = k // block
            w = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
            s = np.full(n * blocks, 0.01, np.float32)
            node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft",
                                    K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
            return model(node, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")], k, n)
        return make

    kinds = [("fp32 MatMul", fp32), ("DynamicQuantizeMatMul", dynamic_int8),
             ("MatMulNBits 8-bit, level 4", nbits(8, 4)), ("MatMulNBits 8-bit, level 0", nbits(8, 0)),
             ("MatMulNBits 4-bit, level 4", nbits(4, 4)), ("MatMulNBits 4-bit, level 0", nbits(4, 0)),
             ("per-row int8 (MatMulInteger)", per_row_int8)]
    # Rows: a vision encoder's 197 patches; a caption prompt's 33 positions (prefill); a
    # decode step at batch 1 and 4; the LM head at batch 1.
    shapes = [(197, 768, 3072, "vision fc1"), (197, 3072, 768, "vision fc2"),
              (33, 768, 3072, "prefill fc1"), (4, 768, 3072, "decode fc1, batch 4"),
              (1, 768, 3072, "decode fc1, batch 1"), (1, 768, 50304, "LM head, batch 1")]
    print("| product (M x K x N) | " + " | ".join(k for k, _ in kinds) + " |")
    print("| --- |" + " ---: |" * len(kinds))
    for m_, k, n, label in shapes:
        cells = []
        x = rng.standard_normal((m_, k), dtype=np.float32)
        for _, make in kinds:
            s = ort.InferenceSession(make(k, n), options(args.threads), providers=["CPUExecutionProvider"])
            ms = median_ms(s, {"x": x}, args.reps)
            cells.append(f"{ms:.3f} ms ({2 * m_ * k * n / ms / 1e6:.0f} GFLOP/s)")
        print(f"| {label} ({m_} x {k} x {n}) | " + " | ".join(cells) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", nargs="?", help="an export folder (blip2-ort export)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--past", type=int, default=40, help="past positions of the decode step")
    ap.add_argument("--kernels", action="store_true", help="time single matrix products instead")
    args = ap.parse_args()
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads", file=sys.stderr)
    if args.kernels:
        kernels(args)
        return
    if not args.export or not os.path.isfile(os.path.join(args.export, "blip2_manifest.json")):
        ap.error("EXPORT: a folder made by `blip2-ort export` (it has blip2_manifest.json)")
    m, rows = graphs(args)
    q = m.get("quantization") or "none"
    qe = m.get("encoder_quantization") or "none"
    print(f"`python scripts/profile_graphs.py EXPORT --threads {args.threads}` "
          f"(quantization {q}, encoders {qe}; ms unprofiled, operator shares from the profiler)\n")
    print("| graph | ms | where the kernel time goes |")
    print("| --- | ---: | --- |")
    for name, ms, top in rows:
        print(f"| {name} | {ms:.1f} | {top} |")


if __name__ == "__main__":
    main()
