"""The GIL is released while images are decoded and preprocessed and while the model
runs, so Python threads overlap.

Each check runs on two workloads, each dominated by one phase (the model: 16 small arrays
already at the export's size and 100 new tokens; preprocessing: large JPEGs as bytes and
one new token), so holding the GIL in either phase fails it:

- the robust one, whatever the machine's load or cores: a Python thread ticks in a loop
  while the main thread makes one call. Holding the GIL through a phase stops the ticker
  for that whole phase; released, its longest pause is a few thread switches. The
  longest pause must be under a quarter of the call;
- the one the issue names: two threads (a model each, one ONNX Runtime thread each) take
  less than twice the time of one, which holds only if they run at the same time. Timing
  depends on the machine, so the ratio must be under 1.9, or under the ratio two threads
  hashing with hashlib (which releases the GIL) get at the same moment plus 0.35; the
  best of three tries counts. On a machine too busy to run two threads at once this
  cannot tell, and the ticker check still does.
"""

import hashlib
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import blip2_ort
from conftest import PHOTOS

CALLS = 4


@pytest.fixture(scope="module")
def pair(exports):
    return [blip2_ort.Model(exports["opt-tiny"], threads=1) for _ in range(2)]


def model_bound(model):
    # 28x28 is the tiny export's input size: preprocessing is next to nothing.
    img = np.asarray(Image.open(PHOTOS / "rocket.jpg").convert("RGB").resize((28, 28)))
    model.caption([img] * 16, max_new_tokens=100, min_new_tokens=100, batch_size=16)


_BIG = []


def preprocess_bound(model):
    if not _BIG:
        big = Image.open(PHOTOS / "chelsea.png").convert("RGB").resize((2400, 1600))
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=90)
        _BIG.append(buf.getvalue())
    model.caption([_BIG[0]] * 2, max_new_tokens=1)


def work(task, model, log):
    for _ in range(CALLS):
        start = time.perf_counter()
        task(model)
        log.append((start, time.perf_counter()))


def run_threads(task, models):
    logs = [[] for _ in models]
    threads = [threading.Thread(target=work, args=(task, m, log)) for m, log in zip(models, logs)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, logs


@pytest.mark.parametrize("task", [model_bound, preprocess_bound])
def test_a_python_thread_runs_during_a_call(task, pair):
    model = pair[0]
    task(model)  # warm up
    stop = threading.Event()
    pauses = []

    def tick():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            pauses.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.02)
    start = time.perf_counter()
    task(model)
    call = time.perf_counter() - start
    stop.set()
    ticker.join()
    assert max(pauses) < call / 4, f"the ticker stopped for {max(pauses):.3f} s during a {call:.3f} s call"


def hashing(_model):
    # hashlib releases the GIL on large buffers: what two threads get from this machine now.
    data = b"x" * (32 << 20)
    for _ in range(3):
        hashlib.sha256(data).digest()


def ratio(task, pair):
    one, _ = run_threads(task, pair[:1])
    two, _ = run_threads(task, pair)
    return two / one


@pytest.mark.parametrize("task", [model_bound, preprocess_bound])
def test_two_threads_take_less_than_twice_one(task, pair):
    # Calls that held the GIL would run one after the other: two threads would take twice
    # one thread's time or more. Either bound shows they overlapped:
    # - under 1.9 times one thread: the "less than twice one", with room for noise
    #   (on CI's two virtual cores, captioning got 1.6-1.75 where hashing got 1.1-1.3:
    #   float-heavy work shares the host's cores less well than hashing does);
    # - under the ratio two threads hashing (hashlib releases the GIL) get at the same
    #   moment plus 0.35: on a machine too loaded to run two threads at once both ratios
    #   move up together.
    # Best of three tries.
    tries = []
    for _ in range(3):
        ref, got = ratio(hashing, pair), ratio(task, pair)
        tries.append((got, ref))
        if got < 1.9 or got < ref + 0.35:
            break
    assert any(got < 1.9 or got < ref + 0.35 for got, ref in tries), (
        f"two threads took (ratio, hashing's ratio) {tries} times one thread"
    )
