"""``qcompile engine``: the ONNX rewrite for TensorRT (weights into plugin-field attributes), the clear error
where TensorRT is missing, and build_engine's calls into TensorRT's Python API against a stand-in module.

The stand-in records calls; it checks our side of the API (which calls, in which order, with what), not
TensorRT's behaviour, which cannot be tested on a machine without TensorRT and a GPU.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import engine
from qcompile.cli import main
from qcompile.formats import get_format
from qcompile.formats.aqlm.weight import CodebookQuantizedWeight
from qcompile.formats.spqr.weight import SpQRQuantizedWeight
from qcompile.formats.spqr import reference as spqr_ref


def _model() -> onnx.ModelProto:
    """x[m, 64] -> FP4MatMul -> SpQRMatMul -> CodebookMatMul -> MatMul (float) -> y, the FP4 weight shared by a
    second FP4MatMul (as share_initializers stores byte-identical tensors once)."""
    rng = np.random.default_rng(0)
    fmt = get_format("nvfp4-rtn")
    fp4 = fmt.quantize((rng.standard_normal((64, 32)) * 0.1).astype(np.float32), None, device="cpu",
                       **fmt.resolve_options({}))
    spqr = SpQRQuantizedWeight("spqr-w3", k=32, n=48, bits=3, group_size=16, stat_bits=3, stat_group=16,
                               tensors=spqr_ref.random_packed(32, 48, with_perm=True, outlier_rate=0.05))
    cb = CodebookQuantizedWeight("aqlm-2x8", rng.integers(0, 256, (16, 6, 2)).astype(np.uint8),
                                 rng.standard_normal((2, 256, 8)).astype(np.float16), np.ones(16, np.float16))
    nodes, inits = [], []
    for q, x, y, p in ((fp4, "x", "h1", "fp4"), (spqr, "h1", "h2", "spqr"), (cb, "h2", "h3", "cb")):
        low = q.lower_native(x, y, p, TensorProto.FLOAT)
        nodes += low.nodes
        inits += low.initializers
    twin = helper.make_node("FP4MatMul", ["x"] + list(nodes[0].input[1:]), ["h1b"], domain="qcompile",
                            name="fp4_twin", **{a.name: helper.get_attribute_value(a) for a in nodes[0].attribute})
    nodes += [twin, helper.make_node("Add", ["h1", "h1b"], ["unused_sum"]),
              helper.make_node("MatMul", ["h3", "float_w"], ["y"])]
    inits.append(numpy_helper.from_array(np.ones((16, 4), np.float32), "float_w"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompile", 1)])


def _attrs(node: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {a.name: a for a in node.attribute}


def test_rewrite_moves_stored_tensors_into_attributes():
    model = _model()
    before = model.SerializeToString()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = engine.to_tensorrt_onnx(model)
    assert model.SerializeToString() == before  # the input model is not touched
    onnx.checker.check_model(out)
    plugin = [n for n in out.graph.node if n.domain == "qcompile"]
    assert [n.op_type for n in plugin] == ["FP4MatMul", "SpQRMatMul", "CodebookMatMul", "FP4MatMul"]
    originals = [n for n in model.graph.node if n.domain == "qcompile"]
    for new, old in zip(plugin, originals):
        assert list(new.input) == [old.input[0]]  # X only
        a = _attrs(new)
        assert helper.get_attribute_value(a["plugin_namespace"]) == b"qcompile"
        assert helper.get_attribute_value(a["plugin_version"]) == b"1"
        for field, name in zip(engine.weight_inputs()[new.op_type], old.input[1:]):
            if not name:
                continue
            assert a[field].type == onnx.AttributeProto.TENSOR
            got, want = numpy_helper.to_array(a[field].t), inits[name]
            assert got.shape == want.shape
            if want.dtype in (np.int16, np.uint16):
                assert got.dtype == np.int32 and np.array_equal(got, want)  # widened, same values
            else:
                assert got.tobytes() == want.tobytes()  # same bytes
        for k in ("K", "N"):
            assert a[k].type == onnx.AttributeProto.INT
    # uint8 travels as int8 (the parser has no unsigned field types), int16 widened (it converts no int16)
    fp4, sp, cb = (_attrs(n) for n in plugin[:3])
    assert fp4["W"].t.data_type == TensorProto.INT8 and fp4["scales"].t.data_type == TensorProto.INT8
    assert fp4["tensor_scale"].t.data_type == TensorProto.FLOAT
    assert cb["codes"].t.data_type == TensorProto.INT8 and cb["codebooks"].t.data_type == TensorProto.FLOAT16
    assert inits["spqr.col_indices"].dtype == np.int16 and sp["col_indices"].t.data_type == TensorProto.INT32
    assert sp["perm"].t.data_type == TensorProto.INT32 and sp["codes"].t.data_type == TensorProto.INT32
    assert sp["values"].t.data_type == TensorProto.FLOAT16
    # initializers only the plugins read are gone; the float MatMul keeps its weight
    assert [t.name for t in out.graph.initializer] == ["float_w"]
    assert [i.name for i in out.graph.input] == ["x"]


def test_rewrite_drops_initializers_listed_as_graph_inputs():
    model = _model()  # old-style graphs (IR < 4) list every initializer as a graph input too
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out = engine.to_tensorrt_onnx(model)
    assert [i.name for i in out.graph.input] == ["x", "float_w"]


def test_rewrite_accepts_constant_nodes_and_absent_optional_inputs():
    model = _model()
    g = model.graph
    fp4 = g.node[0]
    w = next(t for t in g.initializer if t.name == fp4.input[1])
    g.node.insert(0, helper.make_node("Constant", [], ["w_const"], value=w))
    fp4.input[1] = "w_const"
    fp4.input.extend(["", "", ""][: 4 - len(fp4.input) + 1])  # trailing absent inputs written as ""
    out = engine.to_tensorrt_onnx(model)
    node = next(n for n in out.graph.node if n.op_type == "FP4MatMul")
    assert list(node.input) == ["x"] and "W" in _attrs(node) and "bias" not in _attrs(node)


def test_rewrite_refuses_weights_that_are_not_constants():
    model = _model()
    sp = next(n for n in model.graph.node if n.op_type == "SpQRMatMul")
    sp.input[5] = "dynamic_cols"
    model.graph.input.append(helper.make_tensor_value_info("dynamic_cols", TensorProto.INT16, [None]))
    with pytest.raises(engine.EngineError, match=r"input col_indices \('dynamic_cols'\) is not a constant"):
        engine.to_tensorrt_onnx(model)


def test_field_array_types():
    assert engine.field_array(np.array([200], np.uint8)).dtype == np.int8
    assert engine.field_array(np.array([200], np.uint8)).tobytes() == bytes([200])
    wide = engine.field_array(np.array([60000, 3], np.uint16))
    assert wide.dtype == np.int32 and wide.tolist() == [60000, 3]
    assert engine.field_array(np.array([-7], np.int16)).tolist() == [-7]
    for dt in (np.int8, np.int32, np.float16, np.float32):
        assert engine.field_array(np.zeros(2, dt)).dtype == dt
    with pytest.raises(engine.EngineError, match="int64 cannot travel"):
        engine.field_array(np.zeros(2, np.int64))


def _compiled(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    onnx.save(_model(), str(out / "model.onnx"))
    return out


def test_build_engine_without_tensorrt_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(engine.EngineError, match="TensorRT Python package not found"):
        engine.build_engine(_compiled(tmp_path))


def test_cli_engine_without_tensorrt_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rc = main(["engine", str(_compiled(tmp_path)), "--fp16"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("qcompile: error: TensorRT Python package not found")


def test_build_engine_without_a_model(tmp_path):
    with pytest.raises(engine.EngineError, match="no such file"):
        engine.build_engine(tmp_path / "nowhere")


class _FakeTensorRT(types.ModuleType):
    """The parts of TensorRT's Python API build_engine uses, recording what it is asked."""

    def __init__(self, parse_ok: bool = True, build_ok: bool = True):
        super().__init__("tensorrt")
        calls: list = []
        self.calls = calls

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                calls.append(("logger", level))

        class Input:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Registry:
            def load_library(self, path):
                calls.append(("load_library", path))
                return object()

        class Config:
            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, p):
                calls.append(("profile", dict(p.shapes)))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def get_plugin_registry(self):
                return Registry()

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build",))
                return b"ENGINE" if build_ok else None

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                self.network = network

            def parse(self, data):
                m = onnx.load_from_string(data)
                calls.append(("parse", m))
                for i in m.graph.input:  # symbolic dims become -1, as in a TensorRT network
                    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
                    self.network.inputs.append(Input(i.name, tuple(dims)))
                return parse_ok

            def get_error(self, i):
                return "In node 3 (importFallbackPluginImporter): Plugin not found"

        class BuilderFlag:
            FP16 = "fp16"

        for k, v in dict(Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, BuilderFlag=BuilderFlag).items():
            setattr(self, k, v)


def test_build_engine_drives_tensorrt(tmp_path, monkeypatch):
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    lib = tmp_path / "libqcompile_trt_plugins.so"
    lib.write_bytes(b"")
    out = _compiled(tmp_path)
    path = engine.build_engine(out, fp16=True, max_batch=4, max_seq=128, plugin_library=lib, log=lambda s: None)
    assert path == out / "model.engine" and path.read_bytes() == b"ENGINE"
    kinds = [c[0] for c in fake.calls]
    assert kinds.index("load_library") < kinds.index("parse") < kinds.index("build")  # plugins before parsing
    assert ("load_library", str(lib)) in fake.calls and ("flag", "fp16") in fake.calls
    parsed = next(c[1] for c in fake.calls if c[0] == "parse")
    assert all(len(n.input) == 1 for n in parsed.graph.node if n.domain == "qcompile")
    assert ("profile", {"x": ((1, 64), (1, 64), (4, 64))}) in fake.calls

    out_file = tmp_path / "elsewhere" / "m.engine"
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT())
    assert engine.build_engine(out / "model.onnx", output=out_file, plugin_library=lib, log=lambda s: None) == out_file
    assert ("flag", "fp16") not in sys.modules["tensorrt"].calls


def test_build_engine_reports_parser_and_builder_failures(tmp_path, monkeypatch):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    out = _compiled(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(parse_ok=False))
    with pytest.raises(engine.EngineError, match="ONNX parser rejected .*Plugin not found"):
        engine.build_engine(out, plugin_library=lib, log=lambda s: None)
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(build_ok=False))
    with pytest.raises(engine.EngineError, match="could not build the engine"):
        engine.build_engine(out, plugin_library=lib, log=lambda s: None)
    assert not (out / "model.engine").exists()


def test_profile_shapes():
    assert engine._profile_shapes((-1, -1), 4, 256) == ((1, 1), (1, 256), (4, 256))
    assert engine._profile_shapes((2, -1, 64), 4, 256) == ((2, 1, 64), (2, 256, 64), (2, 256, 64))
