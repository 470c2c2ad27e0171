"""Tests for inferpool's default model: conversion, classification sanity, variants, threshold.

Uses the ONNX files in models/effnet_lite0/ (what `make setup` generates), generating them
first when they are missing or stale. Photos come from scikit-image; see photos.py.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile

import numpy as np
import onnxruntime as ort
import pytest

import convert
import photos

VARIANTS = list(convert.VARIANT_FILES)

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug

# Lowest embedding cosine vs fp32 over the 20 evaluation photos, with margin below what was
# measured (fp16: 0.99996, int8: 0.867; see docs/models.md).
MIN_COSINE_VS_FP32 = {"fp16": 0.999, "int8": 0.80}


@pytest.fixture(scope="module")
def card():
    return convert.load_card()


@pytest.fixture(scope="module")
def model_dir(card):
    if convert.mismatches(card, convert.HERE):
        assert convert.main(["--out", str(convert.HERE)]) == 0
    return convert.HERE


@pytest.fixture(scope="module")
def sessions(model_dir, card):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return {
        v: ort.InferenceSession(str(model_dir / spec["file"]), opts, providers=["CPUExecutionProvider"])
        for v, spec in card["variants"].items()
    }


@pytest.fixture(scope="module")
def outputs(sessions):
    """{variant: (embeddings, logits)} for the 20 evaluation photos, in PHOTO_NAMES order."""
    x = photos.batch(photos.originals().values())
    return {v: tuple(s.run(["embedding", "logits"], {"input": x})) for v, s in sessions.items()}


def top1(outputs, variant, name):
    return int(np.argmax(outputs[variant][1][photos.PHOTO_NAMES.index(name)]))


# --- the conversion itself ---------------------------------------------------------------------


def test_same_padding_matches_tensorflow():
    assert convert.same_pads(3, 2, 224) == (0, 1)  # stem: extra row/column at the end
    assert convert.same_pads(5, 2, 56) == (1, 2)
    assert convert.same_pads(3, 1, 112) == (1, 1)
    assert convert.same_pads(5, 1, 14) == (2, 2)
    assert convert.same_pads(1, 1, 7) == (0, 0)


def test_weights_parse_without_torch():
    sd = convert.load_state_dict(convert.weights_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert all(v.dtype == np.float32 for v in sd.values())
    assert sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var"))) == 4_652_008


def _fake_torch_zip(path, tensors, monkeypatch):
    """Writes tensors in torch's zip layout, pickling through stand-in torch modules."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    for obj, module in ((FloatStorage, "torch"), (_rebuild_tensor_v2, "torch._utils")):
        obj.__module__, obj.__qualname__ = module, obj.__name__
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Storage:
        def __init__(self, key, n):
            self.key, self.n = key, n

    class Tensor:
        def __init__(self, storage, offset, shape, strides):
            self.args = (storage, offset, shape, strides, False, collections.OrderedDict())

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, obj.key, "cpu", obj.n) if isinstance(obj, Storage) else None

    state, blobs = collections.OrderedDict(), {}
    for i, (name, (flat, offset, shape, strides)) in enumerate(tensors.items()):
        blobs[str(i)] = np.asarray(flat, "<f4").tobytes()
        state[name] = Tensor(Storage(str(i), len(flat)), offset, shape, strides)
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, blob in blobs.items():
            z.writestr(f"archive/data/{key}", blob)


def test_zip_layout_and_strided_views(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    flat = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    _fake_torch_zip(path, {"a": (flat, 1, (2, 3), (3, 1)), "a_t": (flat, 1, (3, 2), (1, 3))}, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # loading must not need it
    sd = convert.load_state_dict(path)
    np.testing.assert_array_equal(sd["a"], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(sd["a_t"], [[1, 4], [2, 5], [3, 6]])
    assert sd["a"].dtype == np.float32


def test_unpickler_refuses_arbitrary_globals():
    payload = pickle.dumps(print)  # any global outside the state_dict allow-list
    with pytest.raises(pickle.UnpicklingError):
        convert._TorchUnpickler(io.BytesIO(payload)).load()


def test_committed_files_match_card(model_dir, card):
    assert convert.mismatches(card, model_dir) == []


def test_conversion_is_reproducible(tmp_path, card):
    # main() re-verifies every sha256 against card.json and returns 1 on any difference.
    assert convert.main(["--out", str(tmp_path)]) == 0
    assert convert.mismatches(card, tmp_path) == []


# --- the models --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_io_is_float32_with_dynamic_batch(sessions, variant):
    s = sessions[variant]
    (inp,) = s.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", [3, 224, 224])
    assert isinstance(inp.shape[0], str)
    outs = {o.name: o for o in s.get_outputs()}
    assert outs["embedding"].type == outs["logits"].type == "tensor(float)"
    assert outs["embedding"].shape[1:] == [1280] and outs["logits"].shape[1:] == [1000]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chelsea_is_a_cat(outputs, variant):
    assert top1(outputs, variant, "chelsea") in CAT_CLASSES


@pytest.mark.parametrize("variant", VARIANTS)
def test_coffee_is_coffee(outputs, variant):
    assert top1(outputs, variant, "coffee") in COFFEE_CLASSES


def test_dynamic_batch_matches_single_images(sessions):
    s = sessions["fp32"]
    x = photos.batch(photos.load_photo(n) for n in ("chelsea", "coffee", "rocket"))
    batched = s.run(None, {"input": x})
    singles = [s.run(None, {"input": x[i : i + 1]}) for i in range(3)]
    for k in range(2):
        np.testing.assert_allclose(batched[k], np.concatenate([o[k] for o in singles]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_variant_embeddings_stay_close_to_fp32(outputs, variant):
    ref, emb = outputs["fp32"][0], outputs[variant][0]
    cosines = [photos.cosine(a, b) for a, b in zip(ref, emb)]
    assert min(cosines) >= MIN_COSINE_VS_FP32[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_match_threshold_separates_copies_from_other_photos(sessions, card, variant):
    s = sessions[variant]
    same, different = photos.similarity_groups(lambda x: s.run(["embedding"], {"input": x})[0])
    threshold = card["match_threshold"]
    worst_same = min(same, key=same.get)
    worst_diff = max(different, key=different.get)
    assert same[worst_same] > threshold, f"copy {worst_same} scored {same[worst_same]:.3f}"
    assert different[worst_diff] < threshold, f"pair {worst_diff} scored {different[worst_diff]:.3f}"
