"""Graph passes: each is a function from ``onnx.ModelProto`` to ``onnx.ModelProto`` (match kept apart
from rewrite). Installed as ``qcompile.passes``."""
