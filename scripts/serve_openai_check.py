"""Checks a running `blip2-ort serve` with the official `openai` Python client: every
greedy answer must equal, character for character, what `blip2-ort infer` prints for the
same image and question, and the protocol details a client relies on (streaming chunks,
usage, error statuses) must hold.

    python3 scripts/serve_openai_check.py --base-url http://127.0.0.1:PORT \
        --bin target/debug/blip2-ort --model EXPORT_DIR [--served-model-name NAME] \
        [--images tests/data/photos/chelsea.png tests/data/photos/camera.png]

With --retrieval the server serves an image-text retrieval export instead, and the
checks are `embeddings.create` on texts (the client's default base64 transfer and
`encoding_format="float"`) and on image items, against `blip2-ort infer embed-text` and
`embed-image` within 1e-5, plus the 400 a chat request gets there.

Normally run by scripts/serve_openai_check, which starts the server and installs the
client. Prints one `ok: ...` or `FAIL: ...` line per check, then
`client checks: N passed, M failed`; exits 1 when any check failed.
"""
import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import openai

QUESTION = "what is in the picture?"
OTHER_QUESTION = "what color is it?"
COMPLETION_PROMPT = "a photo of"
MAX_TOKENS = 10
# The request in flight when the server is told to stop: longer, so that it really is.
SHUTDOWN_TOKENS = 60


class Checks:
    """Counts and prints check results; a check is a function that raises on failure."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.lock = threading.Lock()

    def run(self, name, fn, *args):
        try:
            detail = fn(*args)
        except AssertionError as e:
            self._fail(name, str(e))
        except openai.APIStatusError as e:
            self._fail(name, f"HTTP {e.status_code}: {e.body!r}")
        except Exception as e:  # noqa: BLE001  (any crash is one failed check, not the end)
            self._fail(name, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        else:
            with self.lock:
                self.passed += 1
                print(f"ok: {name}" + (f" ({detail})" if detail else ""), flush=True)

    def _fail(self, name, why):
        with self.lock:
            self.failed += 1
            print(f"FAIL: {name}: {why}", flush=True)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def data_url(path):
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    mime = {"jpg": "jpeg", "tif": "tiff"}.get(ext, ext)
    with open(path, "rb") as f:
        return f"data:image/{mime};base64," + base64.b64encode(f.read()).decode("ascii")


class Infer:
    """The reference answers: `blip2-ort infer --json` on the same export, memoized."""

    def __init__(self, binary, model):
        self.binary = binary
        self.model = model
        self.cache = {}

    def _run(self, args, max_tokens):
        key = (tuple(args), max_tokens)
        if key not in self.cache:
            cmd = [self.binary, "infer", "--model", self.model, "--quiet", "--json", *args,
                   "--max-new-tokens", str(max_tokens)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            lines = [l for l in out.splitlines() if l.strip()]
            if len(lines) != 1:
                raise RuntimeError(f"{' '.join(cmd)}: expected one JSON line, got {out!r}")
            self.cache[key] = json.loads(lines[0])
        return self.cache[key]

    def vqa(self, image, question, max_tokens=MAX_TOKENS):
        return self._run(["vqa", image, "--question", question], max_tokens)

    def caption(self, image, prompt=None):
        return self._run(["caption", image] + (["--prompt", prompt] if prompt is not None else []), MAX_TOKENS)


def image_message(url, text):
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def check_usage(usage, ref, where):
    """usage present, consistent, and in line with the reference's token count (the eos
    token may or may not be counted as generated)."""
    check(usage is not None, f"{where}: no usage")
    p, c, t = usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
    check(all(isinstance(v, int) for v in (p, c, t)), f"{where}: usage fields not all integers: {usage}")
    check(t == p + c, f"{where}: total_tokens {t} != prompt_tokens {p} + completion_tokens {c}")
    check(p > 0, f"{where}: prompt_tokens is {p}")
    n = len(ref["token_ids"])
    check(n <= c <= min(n + 1, MAX_TOKENS),
          f"{where}: completion_tokens {c}, but infer generated {n} tokens (max {MAX_TOKENS})")


def expected_finish(ref):
    return "length" if len(ref["token_ids"]) >= MAX_TOKENS else "stop"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--bin", required=True, help="the blip2-ort binary whose `infer` gives the reference answers")
    ap.add_argument("--model", required=True, help="the export folder the server was started with")
    ap.add_argument("--served-model-name", help="the id /v1/models lists (default: --model)")
    ap.add_argument("--images", nargs="+",
                    default=["tests/data/photos/chelsea.png", "tests/data/photos/camera.png"])
    ap.add_argument("--sigterm-pid", type=int,
                    help="last, send SIGTERM to this server process while a streaming request is in "
                         "flight and check that the request still completes")
    ap.add_argument("--sigterm-marker", help="a file created once that SIGTERM is sent")
    ap.add_argument("--retrieval", action="store_true",
                    help="the server serves an image-text retrieval export: check /v1/embeddings")
    args = ap.parse_args()
    if args.retrieval:
        return retrieval_checks(args)
    served = args.served_model_name or args.model
    images = args.images
    urls = {img: data_url(img) for img in images}
    infer = Infer(args.bin, args.model)
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="unused",
                           max_retries=0, timeout=300)
    checks = Checks()

    # 1. models.list
    def models():
        ids = [m.id for m in client.models.list()]
        check(served in ids, f"models.list() ids {ids}, expected {served!r} among them")
        return f"ids {ids}"

    checks.run("models.list() lists the served id", models)

    # 2. chat, non-streaming, greedy
    def chat(image, question):
        ref = infer.vqa(image, question)
        r = client.chat.completions.create(model=served, messages=image_message(urls[image], question),
                                           temperature=0, max_tokens=MAX_TOKENS)
        check(r.object == "chat.completion", f"object {r.object!r}")
        check(len(r.choices) == 1, f"{len(r.choices)} choices")
        ch = r.choices[0]
        check(ch.message.role == "assistant", f"role {ch.message.role!r}")
        check(ch.message.content == ref["text"], f"content {ch.message.content!r}, infer text {ref['text']!r}")
        check(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
        check(ch.finish_reason == expected_finish(ref),
              f"finish_reason {ch.finish_reason!r}, but infer generated {len(ref['token_ids'])} tokens "
              f"of at most {MAX_TOKENS} (expected {expected_finish(ref)!r})")
        check_usage(r.usage, ref, "usage")
        return f"{ch.message.content!r}, {ch.finish_reason}, usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}"

    # 3. the same, streaming with usage
    def chat_stream(image, question):
        ref = infer.vqa(image, question)
        stream = client.chat.completions.create(model=served, messages=image_message(urls[image], question),
                                                temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        check(chunks, "no chunks")
        check(all(c.object == "chat.completion.chunk" for c in chunks),
              f"objects {sorted({c.object for c in chunks})}")
        check(len({c.id for c in chunks}) == 1, f"chunk ids differ: {sorted({c.id for c in chunks})}")
        first = chunks[0]
        check(first.choices and first.choices[0].delta.role == "assistant",
              f"first chunk has no assistant role delta: {first}")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(text == ref["text"], f"concatenated deltas {text!r}, infer text {ref['text']!r}")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check(len(finishes) == 1, f"{len(finishes)} chunks carry a finish_reason: {finishes}")
        check(finishes[0] == expected_finish(ref),
              f"finish_reason {finishes[0]!r}, expected {expected_finish(ref)!r} "
              f"(infer generated {len(ref['token_ids'])} tokens)")
        usage_chunks = [c for c in chunks if not c.choices]
        check(len(usage_chunks) == 1, f"{len(usage_chunks)} chunks with empty choices (expected one usage chunk)")
        check(chunks[-1] is usage_chunks[0], "the usage chunk is not the last one")
        check(all(c.usage is None for c in chunks[:-1]), "a chunk before the usage chunk carries usage")
        check_usage(usage_chunks[0].usage, ref, "usage chunk")
        return f"{len(chunks)} chunks, {text!r}, {finishes[0]}"

    # 4. captions: an empty text part, or the image alone
    def caption(image, text):
        ref = infer.caption(image)
        r = client.chat.completions.create(model=served, messages=image_message(urls[image], text),
                                           temperature=0, max_tokens=MAX_TOKENS)
        got = r.choices[0].message.content
        check(got == ref["text"], f"content {got!r}, `infer caption` text {ref['text']!r}")
        check(r.choices[0].finish_reason == expected_finish(ref),
              f"finish_reason {r.choices[0].finish_reason!r}, expected {expected_finish(ref)!r}")
        check_usage(r.usage, ref, "usage")
        return repr(got)

    # 5. completions with a verbatim prompt and the image extension field
    def completion(image):
        ref = infer.caption(image, COMPLETION_PROMPT)
        r = client.completions.create(model=served, prompt=COMPLETION_PROMPT, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"image": {"url": urls[image]}})
        check(r.object == "text_completion", f"object {r.object!r}")
        check(len(r.choices) == 1, f"{len(r.choices)} choices")
        got = r.choices[0].text
        check(got == ref["text"], f"text {got!r}, `infer caption --prompt` text {ref['text']!r}")
        check(r.choices[0].finish_reason == expected_finish(ref),
              f"finish_reason {r.choices[0].finish_reason!r}, expected {expected_finish(ref)!r}")
        check_usage(r.usage, ref, "usage")
        return repr(got)

    for image in images:
        name = os.path.basename(image)
        checks.run(f"chat {name}: content equals infer vqa", chat, image, QUESTION)
        checks.run(f"chat stream {name}: deltas equal infer vqa", chat_stream, image, QUESTION)
        checks.run(f"chat caption {name} (empty text part) equals infer caption", caption, image, "")
        checks.run(f"chat caption {name} (image part only) equals infer caption", caption, image, None)
        checks.run(f"completions {name} prompt {COMPLETION_PROMPT!r} equals infer caption --prompt",
                   completion, image)

    # 6. bad requests
    def expect_400(messages, what):
        try:
            r = client.chat.completions.create(model=served, messages=messages, temperature=0,
                                               max_tokens=MAX_TOKENS)
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"status {e.status_code}")
            body = e.body
            check(isinstance(body, dict) and isinstance(body.get("message"), str) and "type" in body,
                  f"error body is not OpenAI's {{message, type, param, code}}: {body!r}")
            return f"400: {body.get('message')}"
        except openai.APIStatusError as e:
            raise AssertionError(f"{what}: expected 400, got {e.status_code}: {e.body!r}")
        raise AssertionError(f"{what}: expected 400, got 200: {r.choices[0].message.content!r}")

    two = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": urls[images[0]]}},
        {"type": "image_url", "image_url": {"url": urls[images[-1]]}},
        {"type": "text", "text": QUESTION}]}]
    checks.run("two images in one message -> 400", expect_400, two, "two images")
    two_turns = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[images[0]]}},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[images[-1]]}},
                                     {"type": "text", "text": OTHER_QUESTION}]}]
    checks.run("two images in two turns -> 400", expect_400, two_turns, "two images over two turns")
    text_url = "data:text/plain;base64," + base64.b64encode(b"not an image").decode()
    checks.run("non-image data URL -> 400", expect_400, image_message(text_url, QUESTION), "text/plain data URL")
    junk_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG but not really a png").decode()
    checks.run("undecodable image/png data URL -> 400", expect_400, image_message(junk_png, QUESTION),
               "undecodable PNG")

    # 7. concurrent requests, half of them streaming
    jobs = [(images[i % len(images)], (QUESTION, OTHER_QUESTION)[(i // len(images)) % 2], i % 2 == 1)
            for i in range(6)]
    for image, question, _ in jobs:
        infer.vqa(image, question)  # the references first, so the requests really overlap
    barrier = threading.Barrier(len(jobs))

    def one(job):
        image, question, stream = job
        barrier.wait(timeout=60)
        try:
            if stream:
                chunks = client.chat.completions.create(
                    model=served, messages=image_message(urls[image], question), temperature=0,
                    max_tokens=MAX_TOKENS, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            r = client.chat.completions.create(model=served, messages=image_message(urls[image], question),
                                               temperature=0, max_tokens=MAX_TOKENS)
            return r.choices[0].message.content
        except Exception as e:  # noqa: BLE001
            return e

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (image, question, stream), got in zip(jobs, results):
        ref = infer.vqa(image, question)["text"]

        def same(got=got, ref=ref):
            if isinstance(got, openai.APIStatusError):
                raise got
            check(not isinstance(got, Exception), f"{type(got).__name__}: {got}")
            check(got == ref, f"content {got!r}, infer text {ref!r}")
            return repr(got)

        checks.run(f"concurrent {'stream' if stream else 'chat'} {os.path.basename(image)} {question!r}", same)

    # 8. graceful shutdown: SIGTERM while a streaming request is in flight; it must finish
    def shutdown_in_flight():
        image = max(images, key=lambda i: len(infer.vqa(i, QUESTION, SHUTDOWN_TOKENS)["token_ids"]))
        ref = infer.vqa(image, QUESTION, SHUTDOWN_TOKENS)
        stream = client.chat.completions.create(model=served, messages=image_message(urls[image], QUESTION),
                                                temperature=0, max_tokens=SHUTDOWN_TOKENS, stream=True)
        it = iter(stream)
        first = next(it)
        os.kill(args.sigterm_pid, signal.SIGTERM)
        if args.sigterm_marker:
            open(args.sigterm_marker, "w").close()
        chunks = [first, *it]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check(len(finishes) == 1, f"{len(finishes)} chunks carry a finish_reason: {finishes}")
        check(text == ref["text"], f"deltas {text!r}, infer text {ref['text']!r}")
        return f"{len(chunks)} chunks, {len(ref['token_ids'])} tokens"

    if args.sigterm_pid:
        checks.run("SIGTERM with a stream in flight: the stream completes", shutdown_in_flight)

    print(f"client checks: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 1 if checks.failed else 0


EMBED_TEXTS = ["a photo of a cat", "A rocket launch!", "xylophones 42, cafés"]


def close(got, want, what, tol=1e-5):
    """got equals want within tol of want's scale."""
    check(len(got) == len(want), f"{what}: {len(got)} values, expected {len(want)}")
    scale = max(max(abs(x) for x in want), 1e-6)
    diff = max(abs(a - b) for a, b in zip(got, want))
    check(diff <= tol * scale, f"{what}: max abs diff {diff:.3g} over {tol} of scale {scale:.3g}")
    return diff / scale


def retrieval_checks(args):
    """embeddings.create against `infer embed-text` / `embed-image` on a retrieval export."""
    served = args.served_model_name or args.model
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="unused",
                           max_retries=0, timeout=300)
    checks = Checks()

    def infer(task, *inputs):
        cmd = [args.bin, "infer", "--model", args.model, "--quiet", task, "--json", *inputs]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return [json.loads(l) for l in out.splitlines() if l.strip()]

    want_texts = [l["embedding"] for l in infer("embed-text", *EMBED_TEXTS)]
    want_images = [[x for row in l["embedding"] for x in row] for l in infer("embed-image", *args.images)]

    def texts(**kw):
        r = client.embeddings.create(model=served, input=EMBED_TEXTS, **kw)
        check(r.object == "list", f"object {r.object!r}")
        check(r.model == served, f"model {r.model!r}")
        check([d.index for d in r.data] == list(range(len(EMBED_TEXTS))), f"indices {[d.index for d in r.data]}")
        worst = max(close(d.embedding, w, f"text {i}") for i, (d, w) in enumerate(zip(r.data, want_texts)))
        check(r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens, f"usage {r.usage}")
        return f"{len(r.data)} x {len(r.data[0].embedding)} values, max diff {worst:.2g} of scale"

    checks.run("embeddings.create on texts (base64, the client's default) equals infer embed-text", texts)
    checks.run("embeddings.create on texts, encoding_format='float', equals infer embed-text",
               lambda: texts(encoding_format="float"))

    def one_text():
        r = client.embeddings.create(model=served, input=EMBED_TEXTS[0])
        close(r.data[0].embedding, want_texts[0], "one text")
        return f"{len(r.data[0].embedding)} values"

    checks.run("embeddings.create on one string", one_text)

    def images():
        items = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in args.images]
        r = client.embeddings.create(model=served, input=items)
        worst = max(close(d.embedding, w, f"image {i}") for i, (d, w) in enumerate(zip(r.data, want_images)))
        return f"{len(r.data)} x {len(r.data[0].embedding)} values (the query vectors, flat), max diff {worst:.2g} of scale"

    checks.run("embeddings.create on image items equals infer embed-image", images)

    def chat_refused():
        try:
            client.chat.completions.create(model=served, messages=[{"role": "user", "content": "hi"}])
        except openai.BadRequestError as e:
            check("retrieval export" in str(e.body), f"the 400 does not say what the export is: {e.body!r}")
            return f"400: {e.body.get('message') if isinstance(e.body, dict) else e.body}"
        raise AssertionError("chat on a retrieval export was not refused")

    checks.run("chat on a retrieval export -> 400 naming the retrieval endpoints", chat_refused)
    print(f"client checks: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
