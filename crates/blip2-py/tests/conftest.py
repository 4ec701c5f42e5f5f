"""What the blip2_ort tests share: the `blip2-ort` binary (the reference every method is
compared with), the fixture checkpoints exported once per run, and running the CLI."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PHOTOS = ROOT / "tests" / "data" / "photos"
VARIANTS = PHOTOS / "variants"
FIXTURES = ROOT / "tests" / "fixtures"

# The photos the CLI reads (every format and JPEG kind it decodes, EXIF orientations).
PHOTO_FILES = [
    PHOTOS / "rocket.jpg",
    PHOTOS / "camera.png",
    PHOTOS / "chelsea.png",
    PHOTOS / "chelsea_rgba.png",
    PHOTOS / "no_time_for_that_tiny.gif",
    VARIANTS / "exif6.jpg",
    VARIANTS / "exif8.webp",
    VARIANTS / "gray.jpg",
    VARIANTS / "cmyk_adobe.jpg",
    VARIANTS / "progressive.jpg",
    VARIANTS / "orientation3.tif",
]


def _bin():
    b = os.environ.get("BLIP2_ORT_BIN") or str(ROOT / "target" / "debug" / "blip2-ort")
    if not Path(b).is_file():
        pytest.exit(f"{b}: no blip2-ort binary (build it with cargo build -p blip2-cli, or set BLIP2_ORT_BIN)", 2)
    return b


@pytest.fixture(scope="session")
def cli():
    """Runs `blip2-ort ARGS...`, returns stdout; a failure fails the test with stderr."""
    b = _bin()

    def run(*args, stdin=None, check=True):
        r = subprocess.run([b, *map(str, args)], capture_output=True, text=True, input=stdin)
        if check and r.returncode != 0:
            pytest.fail(f"blip2-ort {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}")
        return r.stdout

    return run


@pytest.fixture(scope="session")
def cli_json(cli):
    def run(*args, stdin=None):
        return [json.loads(line) for line in cli(*args, "--json", stdin=stdin).splitlines() if line]

    return run


@pytest.fixture(scope="session")
def exports(tmp_path_factory, cli):
    """The fixture checkpoints, exported once with the CLI."""
    out = tmp_path_factory.mktemp("exports")
    got = {}
    for name in ["opt-tiny", "t5-tiny", "itm-tiny"]:
        cli("export", FIXTURES / name / "checkpoint", "-o", out / name, "--quiet")
        got[name] = str(out / name)
    return got


@pytest.fixture(scope="session")
def models(exports):
    """One loaded Model per export (loading is cheap, but tests share them)."""
    import blip2_ort

    return {name: blip2_ort.Model(path) for name, path in exports.items()}
