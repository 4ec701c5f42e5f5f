"""A bounded load run against a running `blip2-ort serve` (or any OpenAI-compatible
server of an image-text model): for each client count C, C threads each send K streaming
chat requests back to back, and the run reports throughput, latency and time to first
token per C as a markdown table. Standard library only.

    python3 scripts/serve_load.py --base-url http://127.0.0.1:PORT --images DIR_OR_FILES... \
        [--clients 1,4,8,16] [--requests-per-client K] [--max-tokens 20] [--min-tokens 0] [--question Q] \
        [--warmup 2] [--label L] [--json OUT]

Every request is greedy (temperature 0) with a fixed max_tokens and one image; requests
cycle through the distinct images given, so requests served together carry different
images. Without --question the requests ask for a caption (the image alone). Per request
it records the latency (send to `data: [DONE]`), the time to first token (send to the first
chunk with content, or to the finishing chunk when the answer is empty), the completion
tokens (the usage chunk, requested with stream_options.include_usage), the HTTP status and
any error. The C=1 row is one-at-a-time serving; "vs C=1" is throughput over its throughput.

Failures are never dropped: each is counted in its row and listed; the exit status is 1
when any request (warm-up included) failed or went missing.
"""
import argparse
import random
import struct
import zlib
import base64
import hashlib
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse

IMAGE_TYPES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".bmp": "bmp",
               ".gif": "gif", ".tif": "tiff", ".tiff": "tiff"}


def image_files(args):
    """Files as given, folders expanded to their image files (not recursive), sorted."""
    files = []
    for a in args:
        if os.path.isdir(a):
            files += sorted(os.path.join(a, n) for n in os.listdir(a)
                            if os.path.splitext(n)[1].lower() in IMAGE_TYPES
                            and os.path.isfile(os.path.join(a, n)))
        elif os.path.isfile(a):
            files.append(a)
        else:
            sys.exit(f"serve_load: {a}: no such file or folder")
    return files


def noise_png(seed, size=256):
    """A PNG of random RGB noise: each seed a different image, so the server's
    image-embedding cache never answers for it (every request runs the vision encoder)."""
    rnd = random.Random(seed)
    raw = b"".join(b"\x00" + rnd.randbytes(size * 3) for _ in range(size))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def unique_images(n):
    """(name, data URL) of n distinct noise images."""
    return [(f"noise-{i}.png", "data:image/png;base64," + base64.b64encode(noise_png(i)).decode("ascii")) for i in range(n)]


def distinct_images(files):
    """(path, data URL) of each distinct image, by content: copies would not differ."""
    seen, out = set(), []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        mime = IMAGE_TYPES.get(os.path.splitext(f)[1].lower(), "png")
        out.append((f, f"data:image/{mime};base64," + base64.b64encode(data).decode("ascii")))
    return out


class Server:
    def __init__(self, base_url, timeout, api_key):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            sys.exit(f"serve_load: --base-url must be http://HOST:PORT, not {base_url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def connect(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get_json(self, path):
        conn = self.connect()
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {r.status}: {body[:300]!r}")
            return json.loads(body)
        finally:
            conn.close()


class Client:
    """One simulated client: a keep-alive connection, reopened after any failure."""

    def __init__(self, server):
        self.server = server
        self.conn = None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, body):
        """Sends one streaming chat request and reads it to the end; returns its record."""
        rec = {"status": None, "error": None, "latency_s": None, "ttft_s": None, "completion_tokens": None}
        payload = json.dumps(body).encode()
        t0 = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = self.server.connect()
            self.conn.request("POST", self.server.prefix + "/v1/chat/completions", body=payload,
                              headers=self.server.headers)
            resp = self.conn.getresponse()
            rec["status"] = resp.status
            if resp.status != 200:
                text = resp.read().decode("utf-8", "replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                rec["error"] = f"HTTP {resp.status}: {text[:300]}"
                self.close()
                return rec
            self._read_stream(resp, t0, rec)
            if rec["error"] is not None:
                self.close()
        except Exception as e:  # noqa: BLE001  (a failed request is recorded, never lost)
            rec["error"] = f"{type(e).__name__}: {e}"
            self.close()
        return rec

    @staticmethod
    def _read_stream(resp, t0, rec):
        done = False
        finishes = 0
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                rec["latency_s"] = time.perf_counter() - t0
                done = True
                # Nothing may follow [DONE]; read the body's end so the connection can be reused.
                rest = resp.read()
                if rest.strip():
                    rec["error"] = f"data after [DONE]: {rest[:200]!r}"
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec["error"] = f"error in the stream: {json.dumps(chunk['error'])[:300]}"
                resp.read()
                return
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content and rec["ttft_s"] is None:
                    rec["ttft_s"] = time.perf_counter() - t0
                if choice.get("finish_reason"):
                    finishes += 1
                    if rec["ttft_s"] is None:  # an empty answer: its first token is the end
                        rec["ttft_s"] = time.perf_counter() - t0
            if chunk.get("usage"):
                rec["completion_tokens"] = chunk["usage"].get("completion_tokens")
        if not done:
            rec["error"] = "the stream ended without data: [DONE]"
        elif finishes != 1:
            rec["error"] = f"{finishes} chunks carried a finish_reason (expected 1)"
        elif rec["completion_tokens"] is None:
            rec["error"] = "no usage chunk (stream_options.include_usage)"


class Workload:
    """The request bodies: request i of a run takes image i mod n, so images differ
    between the requests in flight together."""

    def __init__(self, model, images, question, max_tokens, min_tokens=0):
        self.model, self.images, self.question, self.max_tokens = model, images, question, max_tokens
        self.min_tokens = min_tokens
        self.next = 0
        self.lock = threading.Lock()

    def body(self):
        with self.lock:
            i = self.next
            self.next += 1
        path, url = self.images[i % len(self.images)]
        content = [{"type": "image_url", "image_url": {"url": url}}]
        if self.question:
            content.append({"type": "text", "text": self.question})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "max_tokens": self.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.min_tokens:
            body["min_tokens"] = self.min_tokens
        return path, body


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


HISTOGRAMS = ("blip2_time_to_first_token_seconds", "blip2_admission_rows", "blip2_admission_seconds",
              "blip2_decode_step_seconds")


def server_histograms(server):
    """The server's own histograms (GET /metrics), each as (sum, count, [(upper bound,
    cumulative count)]): its time to first token (stamped when the first token is picked,
    also when its text is still empty, as random weights often generate whitespace,
    which the client cannot see), and where the engine thread's time goes (taking
    requests in, decode steps). A histogram the server does not have reads as empty."""
    conn = server.connect()
    try:
        conn.request("GET", server.prefix + "/metrics", headers=server.headers)
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {h: [0.0, 0, []] for h in HISTOGRAMS}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for h in HISTOGRAMS:
            if name == h + "_sum":
                out[h][0] = float(line.split()[-1])
            elif name == h + "_count":
                out[h][1] = int(float(line.split()[-1]))
            elif name == h + "_bucket":
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[h][2].append((float("inf") if le == "+Inf" else float(le), int(float(line.split()[-1]))))
    return {h: tuple(v) for h, v in out.items()}


def histogram_delta(before, after):
    """Mean and the p50 / p99 (interpolated within the buckets) of what a histogram saw
    between two readings, in milliseconds."""
    n = after[1] - before[1]
    if n <= 0:
        return None, None, None
    mean = (after[0] - before[0]) / n * 1000
    counts = [(le, a - b) for (le, a), (_, b) in zip(after[2], before[2])]

    def q(p):
        rank = p * n
        lo_bound, lo_count = 0.0, 0
        for le, c in counts:
            if c >= rank:
                if le == float("inf"):
                    return lo_bound * 1000
                frac = (rank - lo_count) / max(c - lo_count, 1)
                return (lo_bound + (le - lo_bound) * frac) * 1000
            lo_bound, lo_count = le, c
        return None

    return mean, q(0.5), q(0.99)


def run_level(server, workload, clients, per_client):
    """C threads, K requests each, back to back; returns (records, wall seconds)."""
    slots = [[None] * per_client for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def worker(c):
        client = Client(server)
        try:
            start.wait()
            for k in range(per_client):
                path, body = workload.body()
                rec = client.request(body)
                rec["image"] = path
                rec["client"] = c
                slots[c][k] = rec
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    records = [r for row in slots for r in row if r is not None]
    return records, wall


def fmt(x, digits=0):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--images", nargs="+", default=[], help="image files or folders of them")
    ap.add_argument("--unique-images", type=int, default=0, metavar="N",
                    help="also N generated noise images; with at least as many as requests, no image repeats "
                         "and the server's image-embedding cache never hits")
    ap.add_argument("--clients", default="1,4,8,16", help="client counts to run, comma-separated")
    ap.add_argument("--requests-per-client", type=int, default=8, metavar="K")
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--min-tokens", type=int, default=0,
                    help="sent as min_tokens (eos banned until then); = --max-tokens makes every answer "
                         "exactly that long, as transformers' timing script does")
    ap.add_argument("--question", default="", help="the question asked about each image (default: caption)")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent one at a time first, not counted")
    ap.add_argument("--model", help="the model id to send (default: the first of /v1/models)")
    ap.add_argument("--api-key", help="sent as a bearer token")
    ap.add_argument("--timeout", type=float, default=600, help="socket timeout per request, seconds")
    ap.add_argument("--label", default="", help="a name for this run, printed and kept in --json")
    ap.add_argument("--json", metavar="OUT", help="also write the rows and every request's record here")
    args = ap.parse_args()

    try:
        levels = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        sys.exit(f"serve_load: --clients must be comma-separated integers, not {args.clients!r}")
    if not levels or min(levels) < 1 or args.requests_per_client < 1 or args.max_tokens < 1 or args.warmup < 0:
        sys.exit("serve_load: --clients, --requests-per-client and --max-tokens must be positive")
    images = distinct_images(image_files(args.images)) + unique_images(args.unique_images)
    if not images:
        sys.exit("serve_load: no image files among --images")
    if len(images) < 2:
        print("serve_load: warning: only one distinct image; every request carries the same one", file=sys.stderr)

    server = Server(args.base_url, args.timeout, args.api_key)
    model = args.model
    if model is None:
        ids = [m["id"] for m in server.get_json("/v1/models").get("data", [])]
        if not ids:
            sys.exit("serve_load: /v1/models lists no model")
        model = ids[0]
    workload = Workload(model, images, args.question, args.max_tokens, args.min_tokens)

    task = f"question {args.question!r}" if args.question else "caption"
    min_note = f", min_tokens {args.min_tokens}" if args.min_tokens else ""
    print(f"# serve load{': ' + args.label if args.label else ''}")
    print(f"server {args.base_url}, model {model}, {len(images)} distinct images, {task}, "
          f"max_tokens {args.max_tokens}{min_note}, greedy, streaming; {args.requests_per_client} requests per client, "
          f"{args.warmup} warm-up", flush=True)

    failures = []  # (phase, record)
    warm = Client(server)
    for _ in range(args.warmup):
        path, body = workload.body()
        rec = warm.request(body)
        rec["image"] = path
        if rec["error"]:
            failures.append(("warm-up", rec))
    warm.close()

    rows = []
    all_records = {}
    for c in levels:
        expected = c * args.requests_per_client
        before = server_histograms(server)
        records, wall = run_level(server, workload, c, args.requests_per_client)
        after = server_histograms(server)
        ttft_h = "blip2_time_to_first_token_seconds"
        s_mean, s_p50, s_p99 = histogram_delta(before[ttft_h], after[ttft_h])
        # The engine thread: sums and counts over this level.
        engine = {h.removeprefix("blip2_"): (after[h][0] - before[h][0], after[h][1] - before[h][1])
                  for h in HISTOGRAMS[1:]}
        good = [r for r in records if r["error"] is None]
        bad = [r for r in records if r["error"] is not None]
        lost = expected - len(records)
        failures += [(f"C={c}", r) for r in bad]
        if lost:
            failures += [(f"C={c}", {"error": "lost: the client thread never recorded it", "status": None,
                                     "image": None})] * lost
        lat = [r["latency_s"] * 1000 for r in good]
        ttft = [r["ttft_s"] * 1000 for r in good if r["ttft_s"] is not None]
        tokens = sum(r["completion_tokens"] or 0 for r in good)
        row = {"clients": c, "requests": expected, "ok": len(good), "errors": len(bad) + lost,
               "wall_s": wall, "throughput_rps": len(good) / wall if wall > 0 else None,
               "tokens_per_s": tokens / wall if wall > 0 else None, "completion_tokens": tokens,
               "latency_ms_p50": statistics.median(lat) if lat else None,
               "latency_ms_p99": percentile(lat, 99),
               "ttft_ms_p50": statistics.median(ttft) if ttft else None, "ttft_ms_p99": percentile(ttft, 99),
               "server_ttft_ms_mean": s_mean, "server_ttft_ms_p50": s_p50, "server_ttft_ms_p99": s_p99,
               "admissions": engine["admission_rows"][1], "admitted_rows": engine["admission_rows"][0],
               "admitting_s": engine["admission_seconds"][0], "decode_steps": engine["decode_step_seconds"][1],
               "stepping_s": engine["decode_step_seconds"][0]}
        rows.append(row)
        all_records[str(c)] = records
        print(f"C={c}: {len(good)}/{expected} ok in {wall:.2f} s", file=sys.stderr, flush=True)

    base = next((r["throughput_rps"] for r in rows if r["clients"] == 1), None)
    print()
    print("| clients | requests | errors | throughput (req/s) | tokens/s | latency p50 / p99 (ms) "
          "| first content p50 / p99 (ms) | TTFT mean / p50 / p99 (ms, server) | throughput vs C=1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["vs_c1"] = r["throughput_rps"] / base if base and r["throughput_rps"] is not None else None
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {fmt(r['throughput_rps'], 2)} "
              f"| {fmt(r['tokens_per_s'], 1)} | {fmt(r['latency_ms_p50'])} / {fmt(r['latency_ms_p99'])} "
              f"| {fmt(r['ttft_ms_p50'])} / {fmt(r['ttft_ms_p99'])} "
              f"| {fmt(r['server_ttft_ms_mean'])} / {fmt(r['server_ttft_ms_p50'])} / {fmt(r['server_ttft_ms_p99'])} "
              f"| {fmt(r['vs_c1'], 2) + 'x' if r['vs_c1'] is not None else '-'} |")

    if any(r["admissions"] for r in rows):
        print()
        print("Where the engine thread's time went (the server's blip2_admission_* and "
              "blip2_decode_step_seconds over each level):")
        print()
        print("| clients | admissions | rows per admission | taking requests in (s, share of wall) "
              "| decode steps | stepping (s, share of wall) | ms a step |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            n, steps, wall = r["admissions"], r["decode_steps"], r["wall_s"]
            share = (lambda x: f"{100 * x / wall:.0f}%") if wall else (lambda x: "-")
            print(f"| {r['clients']} | {n} | {fmt(r['admitted_rows'] / n if n else None, 1)} "
                  f"| {fmt(r['admitting_s'], 2)} ({share(r['admitting_s'])}) | {steps} "
                  f"| {fmt(r['stepping_s'], 2)} ({share(r['stepping_s'])}) "
                  f"| {fmt(r['stepping_s'] / steps * 1000 if steps else None, 2)} |")

    if args.json:
        out = {"label": args.label, "base_url": args.base_url, "model": model,
               "images": [p for p, _ in images], "question": args.question, "max_tokens": args.max_tokens,
               "requests_per_client": args.requests_per_client, "warmup": args.warmup, "rows": rows,
               "failures": [{"phase": ph, **rec} for ph, rec in failures], "requests": all_records}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")

    if failures:
        print(f"\n{len(failures)} failed or lost requests:")
        counts = {}
        for phase, rec in failures:
            key = (phase, rec["error"])
            counts[key] = counts.get(key, 0) + 1
        for (phase, err), n in counts.items():
            print(f"  {phase}: {n} x {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
