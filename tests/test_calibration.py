"""Calibration Hessians from onnxruntime must equal XᵀX of the same linears' inputs captured in torch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qcompile.calibration import collect_hessians, collect_hessians_sequential, group_by_input
from qcompile.errors import CalibrationError, QCompileError
from tiny_model import private_cache, random_tokens, tiny_onnx, tiny_source


def _linears(path) -> dict[str, tuple[str, str]]:
    """{MatMul node name: (input tensor, weight initializer)} for MatMuls with a 2-D initializer weight."""
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    return {n.name: (n.input[0], n.input[1]) for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def _torch_hessians(model, tokens: np.ndarray, names) -> dict[str, torch.Tensor]:
    """Reference: (1/T) Σ xᵀx of every named nn.Linear's input, via forward hooks."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []
    modules = dict(model.named_modules())
    for name in names:
        def hook(_mod, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]
        hooks.append(modules[name].register_forward_hook(hook))
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for h in hooks:
        h.remove()
    return {n: (sums[n] / count[n]).float() for n in names}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_hessians_match_torch_hooks():
    path = tiny_onnx()
    lin = _linears(path)
    assert len(lin) == 14  # 2 layers x (q, k, v, o, gate, up, down); tied lm_head is not an initializer
    tokens = random_tokens(6, 24, seed=3)
    got = collect_hessians(path, {n: t for n, (t, _w) in lin.items()}, tokens, batch_size=4, progress=False)
    ref = _torch_hessians(tiny_source().load_model(), tokens, list(lin))
    for name in lin:
        assert got[name].shape == ref[name].shape
        assert got[name].dtype == torch.float32
        assert _close(got[name], ref[name]) < 1e-4, name
    # q/k/v share one input tensor and hence one Hessian object
    assert got["model.layers.0.self_attn.q_proj"] is got["model.layers.0.self_attn.k_proj"]
    # split into several passes: same numbers
    split = collect_hessians(path, {n: t for n, (t, _w) in lin.items()}, tokens, batch_size=5,
                             progress=False, max_outputs_per_run=3)
    for name in lin:
        assert _close(split[name], got[name]) < 1e-5


def test_hessian_cache_roundtrip():
    path = tiny_onnx()
    lin = {n: t for n, (t, _w) in _linears(path).items()}
    tokens = random_tokens(2, 16, seed=4)
    with private_cache():
        first = collect_hessians(path, lin, tokens, cache_key="tiny-test", progress=False)
        again = collect_hessians(path, lin, tokens, cache_key="tiny-test", progress=False)
        other = collect_hessians(path, lin, random_tokens(2, 16, seed=5), cache_key="tiny-test", progress=False)
    name = next(iter(lin))
    assert torch.equal(first[name], again[name])
    assert not torch.allclose(first[name], other[name])  # different tokens -> not served from cache


def _coarse(w: np.ndarray) -> np.ndarray:
    """A deliberately crude 'quantizer' so that the sequential effect is large."""
    step = np.abs(w).max() / 2
    return (np.round(w / step) * step).astype(np.float32)


def test_fp16_model_hessians_close_to_fp32():
    tokens = random_tokens(3, 16, seed=6)
    lin32 = {n: t for n, (t, _w) in _linears(tiny_onnx()).items()}
    lin16 = {n: t for n, (t, _w) in _linears(tiny_onnx(dtype="float16")).items()}
    assert lin32.keys() == lin16.keys()
    h32 = collect_hessians(tiny_onnx(), lin32, tokens, progress=False)
    h16 = collect_hessians(tiny_onnx(dtype="float16"), lin16, tokens, progress=False)
    for name in lin32:
        assert h16[name].dtype == torch.float32
        assert _close(h16[name], h32[name]) < 1e-2, name


def test_sequential_matches_torch_with_quantized_prefix():
    path = tiny_onnx()
    lin = _linears(path)
    groups = group_by_input({n: t for n, (t, _w) in lin.items()})
    assert [sorted(g) for g in groups[:4]] == [
        ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]
    assert len(groups) == 8
    weights = {n.name: onnx.numpy_helper.to_array(n) for n in onnx.load(str(path)).graph.initializer}
    calls = []

    def quantize_group(hs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        calls.append(sorted(hs))
        return {lin[n][1]: _coarse(weights[lin[n][1]]) for n in hs}

    tokens = random_tokens(5, 20, seed=7)
    got = collect_hessians_sequential(path, groups, tokens, quantize_group, batch_size=2, progress=False)
    assert calls == [sorted(g) for g in groups]

    # torch reference: replace each group's weights after measuring it
    model = tiny_source().load_model()
    modules = dict(model.named_modules())
    for g in groups:
        ref = _torch_hessians(model, tokens, list(g))
        for name in g:
            assert _close(got[name], ref[name]) < 1e-4, name
        with torch.no_grad():
            for name in g:
                modules[name].weight.copy_(torch.from_numpy(_coarse(weights[lin[name][1]]).T))
    # and the sequential effect is real: later Hessians differ from the plain (unquantized) ones
    plain = collect_hessians(path, {n: t for n, (t, _w) in lin.items()}, tokens, progress=False)
    assert _close(got["model.layers.1.mlp.down_proj"], plain["model.layers.1.mlp.down_proj"]) > 1e-2
    assert _close(got["model.layers.0.self_attn.q_proj"], plain["model.layers.0.self_attn.q_proj"]) < 1e-5


def test_sequential_whole_layer_group_recomputes_after_change():
    """A group containing q/k/v *and* o: o's Hessian uses unquantized q/k/v; the next group sees them quantized."""
    path = tiny_onnx()
    lin = _linears(path)
    p0, p1 = "model.layers.0.", "model.layers.1."
    groups = [
        {p0 + m: lin[p0 + m][0] for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")},
        {p0 + "mlp.down_proj": lin[p0 + "mlp.down_proj"][0]},
        {p1 + "self_attn.q_proj": lin[p1 + "self_attn.q_proj"][0]},
    ]
    weights = {n.name: onnx.numpy_helper.to_array(n) for n in onnx.load(str(path)).graph.initializer}
    got = collect_hessians_sequential(
        path, groups, random_tokens(3, 12, seed=9),
        lambda hs: {lin[n][1]: _coarse(weights[lin[n][1]]) for n in hs}, progress=False)
    model = tiny_source().load_model()
    modules = dict(model.named_modules())
    tokens = random_tokens(3, 12, seed=9)
    for g in groups:
        ref = _torch_hessians(model, tokens, list(g))
        for name in g:
            assert _close(got[name], ref[name]) < 1e-4, name
        with torch.no_grad():
            for name in g:
                modules[name].weight.copy_(torch.from_numpy(_coarse(weights[lin[name][1]]).T))


def test_bad_inputs():
    path = tiny_onnx()
    with pytest.raises(QCompileError, match="no tensor named nope"):
        collect_hessians(path, {"x": "nope"}, random_tokens(1, 8), progress=False)
    with pytest.raises(CalibrationError, match="non-empty"):
        collect_hessians(path, {"x": "nope"}, np.zeros((0, 8), np.int64), progress=False)
    lin = _linears(path)
    name, (tensor, _w) = next(iter(lin.items()))
    with pytest.raises(QCompileError, match="unknown initializer"):
        collect_hessians_sequential(path, [{name: tensor}], random_tokens(1, 8), lambda hs: {"zzz": np.zeros(1)},
                                    progress=False)


def test_external_data_model(tmp_path):
    """Weights in a .data file: the pruned copy must still find them (and leave no temp files)."""
    from qcompile.models.export import save_onnx

    ext = save_onnx(onnx.load(str(tiny_onnx())), tmp_path / "ext.onnx", external=True)
    lin = {n: t for n, (t, _w) in _linears(tiny_onnx()).items()}
    tokens = random_tokens(2, 12, seed=8)
    a = collect_hessians(ext, lin, tokens, progress=False)
    b = collect_hessians(tiny_onnx(), lin, tokens, progress=False)
    for name in lin:
        assert torch.equal(a[name], b[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
