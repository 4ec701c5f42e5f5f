"""Rows joining running batches, checked through the server on any provider (made for a
GPU slot: on the CPU the same joins are tested by `cargo test --test engine`).

For each kind of export of the tiny fixtures (OPT and Flan-T5; portable fp32, where
newcomers join with kv_join.onnx; --target cuda fp16, where they join by slots or by
the masked start step; the OPT one again on --graph-ep), it starts `blip2-ort serve
--max-batch 4`, asks each of 12 requests alone (greedy, different images, prompts and
max_tokens, so rows leave at different steps), then all 12 at once and then staggered, so
that newcomers join batches that are already generating, and compares every answer with
the one the same server gave alone. It reads the server's blip2_batch_joins_total to show
the joins happened.

    python3 scripts/gpu_serve_check.py --bin target/release/blip2-ort --ep cuda \
        [--graph-ep cuda-graph] [--out DIR]

Exit status 1 when a request failed, an fp32 export's answer differed from its single
run, or fewer than 90% of an fp16 export's answers equal their single runs (fp16
products may round differently at another batch size). Standard library only.
"""
import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["camera.png", "chelsea.png", "rocket.jpg", "no_time_for_that_tiny.gif", "chelsea_rgba.png"]
PROMPTS = ["", "a photo of", "Question: what is in the picture? Answer:"]
MAX_TOKENS = [4, 9, 15, 24]
N = 12


def data_url(path):
    kind = {"png": "png", "jpg": "jpeg", "gif": "gif"}[path.rsplit(".", 1)[1]]
    with open(path, "rb") as f:
        return f"data:image/{kind};base64," + base64.b64encode(f.read()).decode("ascii")


def requests():
    photos = [data_url(os.path.join(ROOT, "tests/data/photos", p)) for p in PHOTOS]
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "image": {"url": photos[i % len(photos)]},
             "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)], "temperature": 0} for i in range(N)]


class Server:
    def __init__(self, binary, model, ep, log):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", model, "--ep", ep, "--port", "0", "--max-batch", "4",
             "--max-wait-ms", "2", "--quiet"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the server did not start (stdout {line!r}; see {log})")
        u = urllib.parse.urlparse(line.split()[-1])
        self.host, self.port = u.hostname, u.port

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def complete(self, body):
        status, text = self.call("POST", "/v1/completions", body)
        if status != 200:
            return None, f"HTTP {status}: {text[:200]}"
        return json.loads(text)["choices"][0]["text"], None

    def joins(self):
        _, text = self.call("GET", "/metrics")
        for line in text.splitlines():
            if line.startswith("blip2_batch_joins_total "):
                return int(float(line.split()[1]))
        return None


def concurrent(server, reqs, gap_s):
    out = [None] * len(reqs)

    def run(i):
        time.sleep(i * gap_s)
        out[i] = server.complete(reqs[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def check(binary, fixture, target, dtype, ep, out):
    name = f"{fixture} {target} {dtype} --ep {ep}"
    export = os.path.join(out, f"{fixture}-{target}-{dtype}")
    if not os.path.isfile(os.path.join(export, "blip2_manifest.json")):
        cmd = [binary, "export", os.path.join(ROOT, "tests/fixtures", fixture, "checkpoint"), "-o", export,
               "--dtype", dtype, "--force", "--quiet"] + (["--target", "cuda"] if target == "cuda" else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return {"name": name, "error": f"export failed: {r.stderr.strip()[-300:]}"}
    log = os.path.join(out, f"serve-{fixture}-{target}-{dtype}-{ep}.log")
    try:
        server = Server(binary, export, ep, log)
    except RuntimeError as e:
        return {"name": name, "error": str(e)}
    try:
        reqs = requests()
        t0 = time.perf_counter()
        alone = [server.complete(r) for r in reqs]
        per_request = (time.perf_counter() - t0) / len(reqs)
        j0 = server.joins()
        burst = concurrent(server, reqs, 0.0)
        j1 = server.joins()
        # Arrivals spread over about two single-request times: most land mid-batch.
        stagger = concurrent(server, reqs, per_request / 6)
        j2 = server.joins()
    finally:
        server.stop()
    errors = [e for _, e in alone + burst + stagger if e]
    rounds = {}
    for label, got in [("burst", burst), ("staggered", stagger)]:
        same = sum(1 for (a, _), (g, e) in zip(alone, got) if not e and g == a)
        diffs = [f"request {i}: alone {a!r} vs {g!r}" for i, ((a, _), (g, e)) in enumerate(zip(alone, got))
                 if not e and g != a]
        rounds[label] = {"same": same, "of": len(got), "diffs": diffs[:3]}
    return {"name": name, "dtype": dtype, "errors": errors[:3], "n_errors": len(errors), "rounds": rounds,
            "joins": None if None in (j0, j1, j2) else [j1 - j0, j2 - j1],
            "ms_alone": round(per_request * 1000, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/blip2-ort"))
    ap.add_argument("--ep", default="cuda")
    ap.add_argument("--graph-ep", default="", help="also serve the OPT --target cuda export on this profile")
    ap.add_argument("--out", default="/tmp/gpu-serve-check")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    kinds = [("opt-tiny", "portable", "fp32", args.ep), ("opt-tiny", "cuda", "fp16", args.ep)]
    if args.graph_ep:
        kinds.append(("opt-tiny", "cuda", "fp16", args.graph_ep))
    kinds += [("t5-tiny", "portable", "fp32", args.ep), ("t5-tiny", "cuda", "fp16", args.ep)]
    failed = False
    print("| export, profile | alone ms | burst = alone | staggered = alone | joins (burst, staggered) | errors |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    results = []
    for kind in kinds:
        r = check(args.bin, *kind, args.out)
        results.append(r)
        if "error" in r:
            print(f"| {r['name']} | FAILED: {r['error'][:150]} | | | | |", flush=True)
            failed = True
            continue
        b, s = r["rounds"]["burst"], r["rounds"]["staggered"]
        print(f"| {r['name']} | {r['ms_alone']} | {b['same']}/{b['of']} | {s['same']}/{s['of']} | {r['joins']} | "
              f"{r['n_errors']} |", flush=True)
        same, total = b["same"] + s["same"], b["of"] + s["of"]
        if r["n_errors"] or (r["dtype"] == "fp32" and same != total) or same < 0.9 * total:
            failed = True
    for r in results:
        for label, rd in r.get("rounds", {}).items():
            for d in rd["diffs"]:
                print(f"  {r['name']} {label}: {d}")
        for e in r.get("errors", []):
            print(f"  {r['name']}: {e}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("gpu serve check: " + ("FAILED" if failed else "ok"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
