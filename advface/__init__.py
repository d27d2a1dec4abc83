"""advface: template protection for face-recognition systems.

The library is importable without gRPC. Public entry points:

- :mod:`advface.encoders` -- face encoders (dlib, its PyTorch port, ONNX) and their registry;
- :mod:`advface.faces` -- face detection and alignment to an encoder's chip;
- :mod:`advface.datasets` -- LFW, identity folders and the on-disk embedding cache;
- :mod:`advface.metrics` -- verification metrics (LFW 10-fold accuracy, TAR@FAR).
"""

__version__ = "0.1.0"
