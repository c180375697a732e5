"""onnx-dacomp: distribution-aware low-rank compression of ONNX convolutional networks."""

__version__ = "0.1.0"
