#!/usr/bin/env python3
"""Checks blip2-ort's tokens on an execution provider against transformers' recorded ones,
with the blip2-ort binary alone: for a GPU machine, where the test suite is not built.

    scripts/gpu_check.py [--bin target/release/blip2-ort] [--ep cuda] [--graph-ep cuda-graph] [--out DIR] [--max-cases N]

For each tiny fixture checkpoint (tests/fixtures/opt-tiny, opt-tiny-sharded, t5-tiny) it
exports the checkpoint twice with the binary and runs every recorded generate() case
(tests/fixtures/*/reference/generate.json) through `blip2-ort infer batch`:

  fp32       the portable fp32 export on --ep gives transformers' tokens exactly, case by
             case (fp32 on CUDA must give the CPU's tokens: TF32 stays off);
  fp16-cuda  the fp16 `--target cuda` export on --ep: at least 90% of the tokens agree
             with transformers' fp32 ones (near-ties may flip in fp16), as on the CPU;
  graph      OPT only, when --graph-ep is not empty: the same fp16 `--target cuda` export
             on --graph-ep (the decode step captured as a CUDA graph) gives exactly the
             tokens it gives on --ep, case by case.

transformers' own batched Flan-T5 run differs from its single runs (blip2-ort matches the
single runs), so t5-tiny's "batch" case is left out, as in the test suite. Standard
library only. Prints one line per check and `gpu check: N passed, N failed`; exits 1 when
any check failed. `--ep cpu --graph-ep ''` checks the script itself on any machine
(scripts/test runs it so).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PHOTOS = ROOT / "tests" / "data" / "photos"
CHECKPOINTS = ["opt-tiny", "opt-tiny-sharded", "t5-tiny"]


class Failed(Exception):
    pass


def export(bin_, name, out, dtype, target):
    dest = out / f"{name}-{dtype}-{target}"
    cmd = [bin_, "export", str(FIXTURES / name / "checkpoint"), "-o", str(dest),
           "--dtype", dtype, "--target", target, "--force", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"export {name} --dtype {dtype} --target {target}: {r.stderr.strip()}")
    return dest


def flag(key, value):
    """A recorded generate() keyword as the matching `infer` flag."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return ["--" + key.replace("_", "-"), text]


def run_case(bin_, model, ep, case, out):
    """The case's sequences (token ids, in transformers' order) from `infer batch`."""
    req = out / f"requests-{case['name']}.jsonl"
    lines = [json.dumps({"image": str(PHOTOS / img), "prompt": prompt})
             for img, prompt in zip(case["images"], case["prompts"])]
    req.write_text("\n".join(lines) + "\n")
    # One batch for all the case's images, as transformers ran them.
    cmd = [bin_, "infer", "--model", str(model), "--ep", ep, "--quiet", "batch", str(req),
           "--json", "--batch-size", str(max(8, len(lines)))]
    for key, value in case["generate"].items():
        cmd += flag(key, value)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"case {case['name']} on --ep {ep}: {r.stderr.strip()}")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    rows.sort(key=lambda row: (row["line"], row.get("sequence", 0)))
    return [row["token_ids"] for row in rows]


def cases(name):
    recorded = json.loads((FIXTURES / name / "reference" / "generate.json").read_text())
    return [c for c in recorded["cases"] if not (name.startswith("t5") and c["name"] == "batch")]


def agreement(got, want):
    """Tokens equal up to each sequence's first difference, and tokens compared."""
    same = total = 0
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            if a != b:
                break
            same += 1
        total += max(len(g), len(w))
    return same, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "blip2-ort"))
    ap.add_argument("--ep", default="cuda", help="profile for the fp32 and fp16 checks (default cuda)")
    ap.add_argument("--graph-ep", default="cuda-graph",
                    help="profile that captures CUDA graphs, compared with --ep (default cuda-graph; '' skips)")
    ap.add_argument("--out", default="/tmp/gpu-check", help="exports and request files (default /tmp/gpu-check)")
    ap.add_argument("--checkpoints", default=",".join(CHECKPOINTS))
    ap.add_argument("--max-cases", type=int, default=0,
                    help="check only the first N recorded cases of each checkpoint (0: all)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(a.bin).is_file():
        sys.exit(f"error: {a.bin}: no blip2-ort binary (cargo build --release, or pass --bin)")
    passed = failed = 0

    def report(ok, text):
        nonlocal passed, failed
        passed += ok
        failed += not ok
        print(f"{'ok' if ok else 'FAILED'}: {text}", flush=True)

    for name in a.checkpoints.split(","):
        todo = cases(name)[: a.max_cases or None]
        try:
            fp32 = export(a.bin, name, out, "fp32", "portable")
            bad = []
            for case in todo:
                got = run_case(a.bin, fp32, a.ep, case, out)
                if got != case["sequences"]:
                    bad.append(f"{case['name']}: {got} != {case['sequences']}")
            report(not bad, f"{name} fp32 on --ep {a.ep}: {len(todo) - len(bad)}/{len(todo)} cases give transformers' tokens"
                   + "".join(f"\n  {b}" for b in bad))

            fp16 = export(a.bin, name, out, "fp16", "cuda")
            runs = [run_case(a.bin, fp16, a.ep, case, out) for case in todo]
            same = total = 0
            for got, case in zip(runs, todo):
                s, t = agreement(got, case["sequences"])
                same, total = same + s, total + t
            # Enough tokens for the share to mean something: 100 over all the cases, 40
            # over a subset (--max-cases).
            least = 40 if a.max_cases else 100
            report(total >= least and same * 10 >= total * 9,
                   f"{name} fp16 --target cuda on --ep {a.ep}: {same}/{total} tokens agree with transformers fp32 "
                   f"(90% of at least {least} needed)")

            if a.graph_ep and not name.startswith("t5"):
                bad = []
                for got, case in zip(runs, todo):
                    captured = run_case(a.bin, fp16, a.graph_ep, case, out)
                    if captured != got:
                        bad.append(f"{case['name']}: {captured} != {got}")
                report(not bad, f"{name} fp16 --target cuda on --ep {a.graph_ep}: {len(todo) - len(bad)}/{len(todo)} cases "
                       f"give the tokens of --ep {a.ep}" + "".join(f"\n  {b}" for b in bad))
        except Failed as e:
            report(False, f"{name}: {e}")
    print(f"gpu check: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
