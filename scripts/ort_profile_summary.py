"""Sums the ONNX Runtime profiles that `BLIP2_ORT_PROFILE=DIR blip2-ort ...` writes (one
Chrome-trace JSON per session) into one table per graph: its runs (count, median and total
wall time: a run returns when its outputs are ready, so on a GPU this includes the
kernels), then its nodes by provider and operator (count, total, share), largest first.

    python3 scripts/ort_profile_summary.py DIR [--top 15] [--by-rows]

--by-rows splits each operator by the leading dimension of its first input (the rows of
a batch, for the language model's nodes), to compare a step at one row with one at two.

On CUDA a node's time is what launching it took on the host; nodes on the CPU provider and
Memcpy nodes in a GPU session are where a GPU graph waits on the host. Run the command
with CUDA_LAUNCH_BLOCKING=1 to make every launch wait for its kernel: each node's time is
then its time on the GPU (plus the launch), and the whole runs slower. Standard library
only.
"""
import argparse
import collections
import json
import os
import re
import statistics
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--by-rows", action="store_true",
                    help="split operators by the leading dimension of their first input")
    args = ap.parse_args()
    files = sorted(f for f in os.listdir(args.dir) if f.endswith(".json"))
    if not files:
        sys.exit(f"ort_profile_summary: {args.dir}: no profiles (was BLIP2_ORT_PROFILE set to it?)")
    for f in files:
        try:
            with open(os.path.join(args.dir, f)) as fh:
                events = json.load(fh)
        except ValueError as e:
            print(f"## {f}: not readable JSON ({e})")
            continue
        runs = [e["dur"] / 1000 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        nodes = collections.defaultdict(lambda: [0, 0])
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            a = e.get("args", {})
            op = a.get("op_name", "?")
            if args.by_rows:
                shapes = a.get("input_type_shape") or [{}]
                dims = next(iter(shapes[0].values()), [])
                op = f"{op} [{dims[0] if dims else '-'}]"
            k = (a.get("provider", "?").replace("ExecutionProvider", ""), op)
            nodes[k][0] += 1
            nodes[k][1] += e["dur"]
        if not runs and not nodes:
            continue
        graph = re.sub(r"_\d{4}-\d\d-\d\d_.*$", "", f)
        total = sum(v[1] for v in nodes.values()) or 1
        print(f"## {graph} ({f})")
        if runs:
            print(f"runs: {len(runs)}, median {statistics.median(runs):.3f} ms, total {sum(runs):.1f} ms")
        providers = collections.Counter()
        for (p, _), (_, us) in nodes.items():
            providers[p] += us
        print("node time by provider: " + ", ".join(f"{p} {us / 1000:.1f} ms" for p, us in providers.most_common()))
        print("| provider | operator | nodes run | total ms | share |")
        print("| --- | --- | ---: | ---: | ---: |")
        for (p, op), (n, us) in sorted(nodes.items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(f"| {p} | {op} | {n} | {us / 1000:.2f} | {100 * us / total:.1f}% |")
        print()


if __name__ == "__main__":
    main()
