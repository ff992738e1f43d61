"""Size truth and reports.

Bits per weight are counted from the bytes a layer's nodes actually read from the saved model: every
initializer that a ``qcompile.layer``-tagged node consumes and that the lowering created for that layer
(names start with ``qc.<layer>.``): codes, scales, zero points, codebooks, outliers, everything.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

#: Metadata the lower pass puts on every node a layer's lowering creates; how sizes are attributed to layers.
LAYER_KEY = "qcompile.layer"
FORMAT_KEY = "qcompile.format"
PACKED_BITS_KEY = "qcompile.packed_bits_per_weight"
SHAPE_KEY = "qcompile.shape"
ROLE_KEY = "qcompile.role"  # absent: a linear layer; "embedding": the vocabulary tables
OPTIONS_KEY = "qcompile.options"  # the layer's own options where they differ from its format's, e.g. "bits=4"


@dataclasses.dataclass
class LayerSize:
    name: str
    format: str
    shape: tuple[int, int]  # (K, N)
    stored_bytes: int
    bits_per_weight: float  # from the bytes in the file
    packed_bits_per_weight: float | None  # simulated emit: what the format's native storage would take
    role: str = "linear"  # or "embedding" (the LM head / embedding tables)
    options: str = ""  # the layer's own options (OPTIONS_KEY), e.g. "bits=4"

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor occupies on disk (raw or external), without loading external data."""
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    return onnx.numpy_helper.to_array(t).nbytes


def layer_sizes(model: onnx.ModelProto) -> list[LayerSize]:
    """Per-layer storage of every quantized layer in the model, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    layers: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if LAYER_KEY not in meta:
            continue
        name = meta[LAYER_KEY]
        entry = layers.setdefault(name, {"format": meta.get(FORMAT_KEY, "?"), "inputs": set(),
                                         "shape": tuple(int(v) for v in meta[SHAPE_KEY].split(",")),
                                         "packed": meta.get(PACKED_BITS_KEY), "role": meta.get(ROLE_KEY, "linear"),
                                         "options": meta.get(OPTIONS_KEY, "")})
        entry["inputs"].update(i for i in node.input if i in inits and i.startswith(f"qc.{name}."))
    out = []
    for name, e in layers.items():
        nbytes = sum(tensor_nbytes(inits[i]) for i in e["inputs"])
        k, n = e["shape"]
        out.append(LayerSize(name, e["format"], e["shape"], nbytes, 8.0 * nbytes / (k * n),
                             float(e["packed"]) if e["packed"] else None, e["role"], e["options"]))
    return out


def matmulnbits_bits(model: onnx.ModelProto) -> list[LayerSize]:
    """Per-node storage of every ``com.microsoft`` MatMulNBits node, for models without our tags (e.g. ORT's
    own quantizer): bytes of all its initializer inputs (packed B, scales, zero points, g_idx, bias) over
    K*N from its attributes, so both sides are counted the same way, from the file."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if "K" not in attrs or "N" not in attrs:
            raise ValueError(f"MatMulNBits node {node.name!r} lacks its K/N attributes")
        k, n = int(attrs["K"]), int(attrs["N"])
        nbytes = sum(tensor_nbytes(inits[i]) for i in set(node.input[1:]) if i in inits)
        out.append(LayerSize(node.name, f"MatMulNBits int{attrs.get('bits', 4)}", (k, n), nbytes,
                             8.0 * nbytes / (k * n), None))
    return out


def overall_bits(sizes: list[LayerSize], packed: bool = False) -> float:
    """Weighted by parameter count: total bits over total quantized weights."""
    params = sum(s.params for s in sizes)
    if not params:
        return 0.0
    if packed:
        return sum((s.packed_bits_per_weight or s.bits_per_weight) * s.params for s in sizes) / params
    return sum(8.0 * s.stored_bytes for s in sizes) / params


def model_parameters(model: onnx.ModelProto) -> int:
    """Parameters of a float model: elements of its weight and bias initializers (a tied table once; rotary
    caches and shape constants are not parameters)."""
    total = 0
    for t in model.graph.initializer:
        if t.name.endswith((".weight", ".bias")):
            n = 1
            for d in t.dims:
                n *= int(d)
            total += n
    return total


def model_file_bytes(model_path: Path) -> int:
    """The .onnx file plus every external data file beside it that it references."""
    model_path = Path(model_path)
    total = model_path.stat().st_size
    model = onnx.load(str(model_path), load_external_data=False)
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((model_path.parent / f).stat().st_size for f in files)


#: Stock onnxruntime ops that hold quantized weights without being a format's op.
STOCK_QUANTIZED_OPS = {("com.microsoft", "GatherBlockQuantized")}
_VIEW_OPS = ("Reshape", "Transpose", "Cast", "Unsqueeze", "Squeeze")


def _source_initializers(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
                         ) -> list[str]:
    """The initializers a tensor is a view of (through Reshape/Transpose/Cast chains)."""
    if name in inits:
        return [name]
    node = producers.get(name)
    if node is None or node.op_type not in _VIEW_OPS:
        return []
    return [i for inp in node.input[:1] for i in _source_initializers(inp, producers, inits)]


def _quantized_node_shape(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                          producers: dict[str, onnx.NodeProto]) -> tuple[int, int] | None:
    """``(K, N)`` of a quantized op from its attributes (our ops and MatMulNBits carry K and N; for
    GatherBlockQuantized: rows of its data times the unpacked row width)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if "K" in attrs and "N" in attrs:
        return int(attrs["K"]), int(attrs["N"])
    if node.op_type == "GatherBlockQuantized":
        src = _source_initializers(node.input[0], producers, inits)
        if src:
            dims = [int(d) for d in inits[src[0]].dims]
            rows = dims[0]
            packed = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            return packed * 8 // int(attrs.get("bits", 4)), rows
    return None


def inspect_rows(model_path: Path) -> list[dict[str, Any]]:
    """Per-layer rows for ``qcompile inspect``: every layer a compile tagged, every quantized node of a model
    from elsewhere (MatMulNBits, GatherBlockQuantized, our ops: weights shared by two nodes count once), and the
    remaining float MatMul weights."""
    from qcompile.formats import all_formats
    from qcompile.passes.discover import discover_linears, ensure_node_names

    model = ensure_node_names(onnx.load(str(model_path), load_external_data=False))
    rows = [{"name": s.name, "format": s.format + (f" {s.options}" if s.options else "")
             + (" (simulated)" if s.packed_bits_per_weight else ""),
             "role": s.role, "shape": f"{s.shape[0]}x{s.shape[1]}", "bytes": s.stored_bytes,
             "bits_per_weight": s.bits_per_weight,
             "packed_bits_per_weight": s.packed_bits_per_weight} for s in layer_sizes(model)]
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized_ops = {(f.op.domain, f.op.type) for f in all_formats()} | STOCK_QUANTIZED_OPS
    counted: set[str] = set()
    for node in model.graph.node:
        tagged = any(p.key == LAYER_KEY for p in node.metadata_props)
        if tagged or (node.domain, node.op_type) not in quantized_ops:
            continue
        shape = _quantized_node_shape(node, inits, producers)
        if shape is None:
            continue
        sources = {i for inp in node.input[1:] + node.input[:1] for i in _source_initializers(inp, producers, inits)}
        fresh = sources - counted
        counted |= sources
        nbytes = sum(tensor_nbytes(inits[i]) for i in fresh)
        rows.append({"name": node.name, "format": node.op_type + ("" if fresh == sources else " (shares weights)"),
                     "shared": fresh != sources,
                     "role": "embedding" if node.op_type == "GatherBlockQuantized" else "linear",
                     "shape": f"{shape[0]}x{shape[1]}", "bytes": nbytes, "bits_per_weight": 8.0 * nbytes / (shape[0] * shape[1]),
                     "packed_bits_per_weight": None})
    for m in discover_linears(model, include_lm_head=True):
        if m.initializer in counted or any(r["name"] == m.name for r in rows):
            continue
        nbytes = tensor_nbytes(inits[m.initializer])
        rows.append({"name": m.name, "format": "float" + ("" if m.role == "linear" else f" ({m.role})"),
                     "role": m.role, "shape": f"{m.shape[0]}x{m.shape[1]}", "bytes": nbytes,
                     "bits_per_weight": 8.0 * nbytes / (m.shape[0] * m.shape[1]), "packed_bits_per_weight": None})
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` = (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def write_results(out: Path, data: Any, markdown: str) -> list[Path]:
    """A benchmark's results beside each other: ``out`` (JSON) and the same name with ``.md`` (its table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    out.with_suffix(".md").write_text(markdown + "\n")
    return [out, out.with_suffix(".md")]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def allocation_summary(alloc: Any, report: dict[str, Any]) -> dict[str, Any]:
    """report.json's ``allocation`` (``-f auto``): the budget, the mix, predicted against measured bytes and damage,
    how long the allocation took, and every layer's candidates as the knapsack saw them."""
    layers = report["layers"]
    mix: dict[str, dict[str, Any]] = {}
    for layer in layers:
        m = mix.setdefault(layer["candidate"], {"layers": 0, "weights": 0, "bytes": 0})
        m["layers"] += 1
        m["weights"] += layer["shape"][0] * layer["shape"][1]
        m["bytes"] += layer["bytes"]
    for m in mix.values():
        m["bits_per_weight"] = 8.0 * m["bytes"] / m["weights"]
    return {
        "budget": alloc.budget, "budget_bytes": alloc.budget_bytes, "palette": list(alloc.palette), "tie": alloc.tie,
        "estimator": alloc.estimator,
        "predicted_bytes": alloc.bytes, "bytes": sum(layer["bytes"] for layer in layers),
        "predicted_file_bytes": alloc.file_bytes,
        "predicted_damage": alloc.damage, "damage": sum(layer["damage"] for layer in layers),
        "damage_tuned": (sum(layer["damage_tuned"] if layer["damage_tuned"] is not None else layer["damage"]
                             for layer in layers)),
        "seconds": alloc.seconds,
        "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1]["weights"])),
        "candidates": alloc.table,
    }


LAYER_COLUMNS = [("name", "layer", "s"), ("shape", "K x N", "s"), ("format", "format", "s"),
                 ("bits_per_weight", "bits/weight", ".3f"), ("rel_output_error", "rel. output error", ".2e"),
                 ("quantize_seconds", "quantize s", ".2f")]


def _embeddings_text(emb: dict[str, Any] | None) -> str:
    if not emb or emb.get("bits_per_weight") is None:
        return "float"
    return f"{emb['format']}, {emb['bits_per_weight']:.3f} bits/weight over {emb['params']:,} weights"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the headline numbers, then one row per layer."""
    ref, q = report.get("ppl_reference"), report.get("ppl_quantized")
    lines = [f"# qcompile report: {report['model']} → {report['format']}", ""]
    head = [
        ("format", report["format"]), ("emit", report.get("emit")), ("model", report["model"]),
        ("bits per weight (quantized linears)", f"{report['bits_per_weight']:.3f}"),
        ("quantized parameters", f"{report['quantized_params']:,}"),
        ("embeddings (tied: one table)", _embeddings_text(report.get("embeddings"))),
        ("file bytes (model.onnx and its data)", f"{report['file_bytes']:,}"),
        ("bits per parameter (whole file)", f"{report['bits_per_parameter']:.3f}" if report.get("bits_per_parameter")
         else "—"),
        ("source model bytes", f"{report['source_bytes']:,}" if report.get("source_bytes") else "—"),
        ("perplexity, float", f"{ref:.3f}" if ref else "not measured"),
        ("perplexity, quantized", f"{q:.3f}" if q else "not measured"),
        ("perplexity change", f"{100 * (q / ref - 1):+.2f}%" if ref and q else "—"),
        ("eval tokens", f"{report.get('eval_tokens', 0):,}"), ("calibration tokens", f"{report.get('calib_tokens', 0):,}"),
        ("compile seconds", f"{report.get('compile_seconds', 0):.1f}"),
        ("quantize seconds (sum over layers)", f"{sum(l.get('quantize_seconds') or 0 for l in report['layers']):.1f}"
         + (f" ({report['resumed_layers']} layers resumed from a checkpoint: their time is the earlier run's)"
            if report.get("resumed_layers") else "")),
        ("peak memory (MiB)", f"{report.get('peak_memory_mib', 0):.0f}"),
    ]
    alloc = report.get("allocation")
    if alloc:
        s = alloc["seconds"]
        head[1:1] = [
            ("budget", f"{alloc['budget']} ({alloc['budget_bytes']:,} bytes for the linears)"),
            ("linears' bytes, predicted / in the file", f"{alloc['predicted_bytes']:,} / {alloc['bytes']:,}"),
            ("estimated KL to float, predicted / as quantized / as tuned",
             f"{alloc['predicted_damage']:.4f} / {alloc['damage']:.4f} / {alloc['damage_tuned']:.4f} nats per token "
             f"({alloc['estimator']})"),
            ("allocation seconds", f"{s['total']:.0f} (sensitivity {s['sensitivity']:.0f}, candidates "
                                   f"{s['candidates']:.0f}, knapsack {s['knapsack']:.0f})"),
        ]
        if alloc.get("predicted_file_bytes"):
            head.insert(3, ("file bytes, predicted", f"{alloc['predicted_file_bytes']:,}"))
    if report.get("layer_options"):
        head.insert(3, ("layer options (-L, in order)", ", ".join(f"`{o}`" for o in report["layer_options"])))
    tune = report.get("tune")
    if tune and "steps" in tune:
        head.append(("fine-tuning (whole model)", f"{tune['steps']} steps x {tune['windows_per_step']} windows, KL to "
                     f"float {tune['kl_first_quarter_mean']:.3f} -> {tune['kl_last_quarter_mean']:.3f} (first/last "
                     f"quarter of steps), {tune['seconds']:.0f} s"))
    elif tune:
        head.append(("fine-tuning (whole model)", f"skipped: {tune.get('skipped')}"))
    if report.get("emit") == "simulated":
        head.insert(4, ("note", "simulated emit: the file holds dequantized floats; bits per weight is what the "
                                "format's native storage takes"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in head], ""]
    if alloc:
        lines += ["## Mix", "", markdown_table([{"candidate": k, **v} for k, v in alloc["mix"].items()],
                                               [("candidate", "palette entry", "s"), ("layers", "layers", "d"),
                                                ("weights", "weights", ",d"), ("bytes", "bytes", ",d"),
                                                ("bits_per_weight", "bits/weight", ".3f")]), ""]
    lines += ["## Layers", ""]
    rows = [dict(layer, shape="x".join(map(str, layer["shape"])),
                 own=",".join(f"{k}={v}" for k, v in layer.get("layer_options", {}).items()))
            for layer in report["layers"]]
    if alloc:
        columns = [("name", "layer", "s"), ("shape", "K x N", "s"), ("candidate", "palette entry", "s"),
                   ("bits_per_weight", "bits/weight", ".3f"), ("predicted_bytes", "bytes predicted", ",d"),
                   ("bytes", "bytes", ",d"), ("predicted_damage", "damage predicted", ".2e"),
                   ("damage", "damage", ".2e"), ("damage_tuned", "tuned", ".2e"),
                   ("rel_output_error", "rel. output error", ".2e")]
    else:
        columns = LAYER_COLUMNS + ([("own", "own options", "s")] if any(r["own"] for r in rows) else [])
    lines.append(markdown_table(rows, columns))
    return "\n".join(lines) + "\n"
