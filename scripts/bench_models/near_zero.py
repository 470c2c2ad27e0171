#!/usr/bin/env python3
"""Writes a near-zero-cost ONNX model and its card: a stand-in for a very fast accelerator.

The graph takes the default model's input ([N, 3, 224, 224], NCHW) and returns a 1280-d
embedding from a global average pool and a 3x1280 matrix product, so one image costs a few
microseconds of compute. Served by the sidecar, it shows what the CPU side of the request path
(HTTP, decoding, batching) can deliver when inference is almost free, which is the question a
GPU replica asks of it. Used by scripts/bench-pipeline.sh; not a model to match images with.

    .cache/venv/bin/python scripts/bench_models/near_zero.py --out .cache/bench-models/near-zero
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIM = 1280


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(12345)
    weight = numpy_helper.from_array(rng.standard_normal((3, DIM)).astype(np.float32), name="w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "near_zero",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inferpool")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for near_zero.onnx and card.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = build().SerializeToString()
    (args.out / "near_zero.onnx").write_bytes(data)
    card = {
        "name": "near-zero",
        "description": "Benchmark stand-in for a very fast accelerator: global average pool + 3x1280 matmul.",
        "license": "Apache-2.0",
        "source": "scripts/bench_models/near_zero.py",
        "input": {
            "name": "input", "layout": "NCHW", "width": 224, "height": 224, "color": "RGB",
            "resize": "stretch", "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0],
        },
        "output": {"name": "embedding", "dim": DIM},
        "similarity": "cosine",
        "match_threshold": 0.9,
        "variants": {"fp32": {"file": "near_zero.onnx", "sha256": hashlib.sha256(data).hexdigest()}},
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"near_zero: wrote {args.out / 'near_zero.onnx'} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
