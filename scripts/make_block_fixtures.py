"""Reference values for the exporter's block tests (tests/blocks.rs) that need
transformers: T5's relative-position buckets for Flan-T5's settings (32 buckets,
max distance 128), both directions, for relative positions -128..=128.

    pip install -r scripts/requirements-fixtures.txt
    python scripts/make_block_fixtures.py
"""

import json
from pathlib import Path

import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "blocks" / "t5_buckets.json"
rel = torch.arange(-128, 129)
doc = {
    "transformers": transformers.__version__,
    "num_buckets": 32,
    "max_distance": 128,
    "relative_positions": rel.tolist(),
}
for name, bidirectional in [("bidirectional", True), ("causal", False)]:
    doc[name] = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
    ).tolist()
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(doc) + "\n")
print(out)
