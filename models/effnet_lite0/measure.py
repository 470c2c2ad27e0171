#!/usr/bin/env python3
"""Measures inferpool's default model variants (fp32, fp16, int8) on CPU; prints a Markdown report.

This produces the tables in docs/models.md:

* accuracy vs fp32 on the scikit-image evaluation photos and their edited copies (80 images):
  top-1 agreement and embedding cosine (min / mean);
* matching: the lowest copy-vs-original cosine and the highest cosine between different photos,
  against card.json's match_threshold;
* file size, and throughput in images/s at batch 1 and batch 8 with onnxruntime's
  CPUExecutionProvider (intra-op threads as given, default 2).

Timings are the best of several interleaved rounds per variant, which keeps a background job on
a small machine from penalising whichever variant happened to run during it.

Usage::

    .cache/venv/bin/python models/effnet_lite0/measure.py [--dir DIR] [--threads 2] [--seconds 1.5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import convert
import photos


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def open_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluation_batch() -> np.ndarray:
    """The 20 photos followed by their copies, kind by kind: float32 [80, 3, 224, 224]."""
    originals = list(photos.originals().values())
    images = originals + [photos.make_copy(img, kind) for kind in photos.COPY_KINDS for img in originals]
    return photos.batch(images)


def run(session, x: np.ndarray, batch_size: int = 8) -> tuple:
    outs = [session.run(["embedding", "logits"], {"input": x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def throughput(session, x: np.ndarray, batch_size: int, seconds: float) -> float:
    """Images per second for repeated runs of one batch."""
    feed = {"input": np.ascontiguousarray(x[:batch_size])}
    session.run(None, feed)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        count += batch_size
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=convert.HERE, help="directory with the .onnx files")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--seconds", type=float, default=1.5, help="seconds per timing round")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    args = ap.parse_args(argv)

    card = convert.load_card()
    variants = {v: args.dir / spec["file"] for v, spec in card["variants"].items()}
    sessions = {v: open_session(p, args.threads) for v, p in variants.items()}
    x = evaluation_batch()

    results = {v: run(s, x) for v, s in sessions.items()}
    ref_emb, ref_logits = results["fp32"]

    speed = {(v, b): 0.0 for v in sessions for b in (1, 8)}
    for _ in range(args.rounds):
        for v, s in sessions.items():
            for b in (1, 8):
                speed[(v, b)] = max(speed[(v, b)], throughput(s, x, b, args.seconds))

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs visible; onnxruntime {ort.__version__} "
          f"CPUExecutionProvider, intra-op threads {args.threads}; best of {args.rounds} x {args.seconds:g}s")
    print(f"evaluation images: {len(photos.PHOTO_NAMES)} scikit-image photos + {len(photos.COPY_KINDS)} "
          f"edited copies each = {len(x)}\n")
    print("| variant | file size | top-1 = fp32 | cosine vs fp32 min / mean | batch 1 img/s | batch 8 img/s |")
    print("|---|---|---|---|---|---|")
    for v in sessions:
        emb, logits = results[v]
        agree = np.mean(np.argmax(logits, 1) == np.argmax(ref_logits, 1))
        cos = np.sum(photos.normalise(emb) * photos.normalise(ref_emb), axis=1)
        size = variants[v].stat().st_size / 1e6
        s1, s8 = speed[(v, 1)], speed[(v, 8)]
        r1, r8 = s1 / speed[("fp32", 1)], s8 / speed[("fp32", 8)]
        print(f"| {v} | {size:.1f} MB | {agree:.0%} ({int(round(agree * len(x)))}/{len(x)}) "
              f"| {cos.min():.4f} / {cos.mean():.4f} | {s1:.0f} ({r1:.2f}x) | {s8:.0f} ({r8:.2f}x) |")

    threshold = card["match_threshold"]
    print(f"\nmatching (cosine), match_threshold {threshold}:\n")
    print("| variant | min copy vs original (which) | max different photos (which) |")
    print("|---|---|---|")
    for v, s in sessions.items():
        same, different = photos.similarity_groups(lambda b, s=s: s.run(["embedding"], {"input": b})[0])
        ws, wd = min(same, key=same.get), max(different, key=different.get)
        print(f"| {v} | {same[ws]:.3f} ({ws[0]}, {ws[1]}) | {different[wd]:.3f} ({wd[0]} vs {wd[1]}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
