"""Reference embeddings from Python onnxruntime, for tests that compare the sidecar against it.

Reads a preprocessed input tensor (raw little-endian float32, shape given on the command line),
runs the model with onnxruntime's CPU provider, and prints the named output as JSON.

    ort_reference.py MODEL.onnx TENSOR.f32 N,C,H,W [--input input] [--output embedding]
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tensor")
    p.add_argument("shape", help="comma-separated, e.g. 1,3,224,224")
    p.add_argument("--input", default="input")
    p.add_argument("--output", default="embedding")
    a = p.parse_args()
    shape = tuple(int(d) for d in a.shape.split(","))
    x = np.fromfile(a.tensor, dtype="<f4").reshape(shape)
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    (y,) = sess.run([a.output], {a.input: x})
    json.dump(y.astype(np.float64).tolist(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
