"""qcompile: ONNX graph-rewriting compiler for quantized transformer weights."""
__version__ = "0.1.0"
