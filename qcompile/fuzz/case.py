"""A fuzz case (one op node with concrete inputs), the ONNX model built from it, and the mutations every op
shares. Op modules describe their inputs and attributes in an :class:`OpSpec`; the shared mutations read that
description, so adding an op adds no mutation boilerplate."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from onnx import helper, numpy_helper

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
ACTIVATION_DTYPES = (F32, F16)
#: element types the dtype mutation draws from (every one ONNX can carry that numpy has)
DTYPES = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16,
                                     np.int32, np.int64, np.uint32, np.bool_))
REQUIRED = object()  # AttrSpec.default of an attribute without default


class Rejected(ValueError):
    """The reference's verdict: these inputs break the op contract, so the op must answer with an error."""


@dataclass(frozen=True)
class InputSpec:
    """One op input. ``dtypes=None`` means the activation type T (X's type, float32 or float16)."""
    name: str
    dtypes: tuple[np.dtype, ...] | None
    optional: bool = False
    floats: bool = False  # float data worth special values (NaN, Inf, denormals, huge)


@dataclass(frozen=True)
class AttrSpec:
    name: str
    kind: type  # int or str
    default: Any = REQUIRED
    interesting: tuple = ()  # other values worth trying, valid or not


@dataclass
class Case:
    """Everything one run needs: the node's attributes as written (mutations may drop or retype them), every
    op input by name (None: absent), which are initializers (the rest are graph inputs fed at run time), the
    kernel-path environment switches, intra-op threads, and how many times to run the session."""
    op: str
    attrs: dict[str, Any]
    inputs: dict[str, np.ndarray | None]
    constant: set[str]
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    runs: int = 1
    seed: int = 0
    mutations: list[str] = field(default_factory=list)

    @property
    def x(self) -> np.ndarray | None:
        return self.inputs.get("X")

    def describe(self) -> str:
        lines = [f"{self.op} case seed {self.seed}: mutations {self.mutations or ['none']}",
                 f"  attrs {self.attrs}", f"  env {self.env or '{}'} threads {self.threads} runs {self.runs}"]
        for name, arr in self.inputs.items():
            if arr is None:
                lines.append(f"  {name}: absent")
            else:
                where = "initializer" if name in self.constant else "graph input"
                lines.append(f"  {name}: {arr.dtype} {list(arr.shape)} ({where})")
        return "\n".join(lines)


@dataclass(frozen=True)
class OpSpec:
    """What the shared code needs to know about an op; ``base``, ``mutations`` and ``linear`` are the op's own."""
    op: str
    inputs: tuple[InputSpec, ...]
    attrs: tuple[AttrSpec, ...]
    env: dict[str, tuple[str | None, ...]]  # kernel-path switch -> values to draw (None: unset)
    base: Callable[[np.random.Generator], Case]  # a valid case
    mutations: dict[str, Callable[[Case, np.random.Generator], str | None]]  # op-specific ones
    linear: Callable[[Case, dict[str, Any]], Any]  # validated case -> oracle.Linear (raises Rejected)

    def input(self, name: str) -> InputSpec:
        return next(s for s in self.inputs if s.name == name)


# ---- the model ----------------------------------------------------------------------------------------------


def to_model(case: Case, spec: OpSpec) -> bytes:
    """One node; X and non-constant inputs are graph inputs of unknown shape, the rest initializers."""
    names: list[str] = []
    graph_inputs, inits = [], []
    for s in spec.inputs:
        arr = case.inputs.get(s.name)
        if arr is None:
            names.append("")
            continue
        names.append(s.name)
        if s.name in case.constant and s.name != "X":
            inits.append(numpy_helper.from_array(arr, s.name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(s.name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                                              None))
    while names and names[-1] == "":
        names.pop()
    out_type = helper.np_dtype_to_tensor_dtype(case.x.dtype if case.x is not None else F32)
    node = helper.make_node(spec.op, names, ["Y"], domain="qcompile", **case.attrs)
    graph = helper.make_graph([node], "fuzz", graph_inputs, [helper.make_tensor_value_info("Y", out_type, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompile", 1)])
    return model.SerializeToString()


def feeds(case: Case) -> dict[str, np.ndarray]:
    return {k: v for k, v in case.inputs.items() if v is not None and (k == "X" or k not in case.constant)}


# ---- the reference's generic checks -------------------------------------------------------------------------


def read_attrs(case: Case, spec: OpSpec) -> dict[str, Any]:
    """The attributes as the op reads them: defaults filled in; a missing required one or a wrong type rejects."""
    out = {}
    for a in spec.attrs:
        if a.name not in case.attrs:
            if a.default is REQUIRED:
                raise Rejected(f"attribute {a.name} missing")
            out[a.name] = a.default
            continue
        v = case.attrs[a.name]
        if type(v) is not a.kind:
            raise Rejected(f"attribute {a.name} has type {type(v).__name__}")
        out[a.name] = v
    return out


def check_input_types(case: Case, spec: OpSpec) -> None:
    """Required inputs present, every input of a type the schema or the adapter accepts."""
    x = case.x
    if x is None or x.dtype not in ACTIVATION_DTYPES:
        raise Rejected("X must be float32 or float16")
    for s in spec.inputs:
        arr = case.inputs.get(s.name)
        if arr is None:
            if not s.optional:
                raise Rejected(f"{s.name} is required")
            continue
        allowed = (x.dtype,) if s.dtypes is None else s.dtypes
        if arr.dtype not in allowed:
            raise Rejected(f"{s.name} has type {arr.dtype}")


# ---- drawing valid cases --------------------------------------------------------------------------------------

# leading dims of X: M = 1 (the batch-1 paths) most often, then M = 0, odd sizes around the kernels' row
# blocks (6, 8, 16), several leading dims, and none at all (a 1-D X)
# leading shapes of X; 34, 40 and 64 rows reach the AMX prefill (32 rows and more)
LEADS: tuple[tuple[int, ...], ...] = ((1,),) * 8 + ((), (0,), (2,), (3,), (5,), (6,), (7,), (9,), (16,), (17,), (27,),
                                                   (2, 3), (3, 1, 2), (1, 1), (64,), (40,), (2, 17))


def draw_lead(rng: np.random.Generator) -> tuple[int, ...]:
    return LEADS[rng.integers(len(LEADS))]


def finish(case: Case, spec: OpSpec, rng: np.random.Generator) -> Case:
    """Draws what every op's base case shares: initializers vs graph inputs, env switches, threads, runs."""
    weights = [s.name for s in spec.inputs if s.name != "X"]
    mode = rng.choice(["constant", "constant", "inputs", "mixed"])
    if mode == "constant":
        case.constant = set(weights)
    elif mode == "mixed":
        case.constant = {w for w in weights if rng.random() < 0.5}
    else:
        case.constant = set()
    case.env = {k: v for k, vals in spec.env.items() if (v := vals[rng.integers(len(vals))]) is not None}
    case.threads = int(rng.choice([1, 1, 2]))
    case.runs = int(rng.choice([1, 1, 1, 2]))
    return case


# ---- shared mutations -----------------------------------------------------------------------------------------


def special_values(dtype: np.dtype) -> dict[str, float]:
    fi = np.finfo(dtype)
    tiny = float(fi.smallest_normal)
    return {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "0": 0.0, "-0": -0.0,
            "dmin": float(fi.smallest_subnormal), "-dmin": -float(fi.smallest_subnormal),
            "dmax": tiny - float(fi.smallest_subnormal), "tiny": tiny, "max": float(fi.max), "-max": -float(fi.max),
            "big": float(fi.max) ** 0.5, "-big": -float(fi.max) ** 0.5}


def _present(case: Case, spec: OpSpec, pred: Callable[[InputSpec, np.ndarray], bool] = lambda s, a: True) -> list[str]:
    return [s.name for s in spec.inputs if case.inputs.get(s.name) is not None and pred(s, case.inputs[s.name])]


def pick(rng: np.random.Generator, seq: list | tuple) -> Any:
    return seq[rng.integers(len(seq))]


def mutate_special_floats(spec: OpSpec, case: Case, rng: np.random.Generator) -> str | None:
    """NaN, +-Inf, +-0, denormals, the largest finite and its square root into one, a few, a row or all
    elements of a float input (activations, scales, statistics, codebooks, outlier values, bias)."""
    names = _present(case, spec, lambda s, a: s.floats and a.dtype.kind == "f" and a.size > 0)
    if not names:
        return None
    name = pick(rng, names)
    arr = case.inputs[name].copy()
    specials = special_values(arr.dtype)
    label = pick(rng, list(specials))
    flat = arr.reshape(-1)
    how = pick(rng, ["one", "one", "few", "row", "all"])
    if how == "one":
        idx = [int(rng.integers(flat.size))]
    elif how == "few":
        idx = list(rng.integers(flat.size, size=min(flat.size, 4)))
    elif how == "row" and arr.ndim >= 2:
        r = int(rng.integers(arr.shape[0]))
        idx = list(range(r * (flat.size // arr.shape[0]), (r + 1) * (flat.size // arr.shape[0])))
    else:
        idx = slice(None)
    flat[idx] = specials[label]
    case.inputs[name] = arr
    return f"special:{name}:{how}={label}"


def mutate_shape(spec: OpSpec, case: Case, rng: np.random.Generator) -> str | None:
    """Truncated or extended along one axis, flattened, an extra axis, emptied, a scalar, an axis dropped."""
    name = pick(rng, _present(case, spec))
    arr = case.inputs[name]
    kinds = ["extend", "unsqueeze", "empty"]
    if arr.ndim and max(arr.shape) > 0:
        kinds.append("trunc")
    if arr.ndim != 1:
        kinds.append("flatten")
    if arr.size:
        kinds.append("scalar")
    if arr.ndim >= 2 and arr.shape[0]:
        kinds.append("drop_axis")
    kind = pick(rng, kinds)
    if kind in ("trunc", "extend"):
        axes = [a for a in range(arr.ndim) if kind == "extend" or arr.shape[a] > 0] or [0]
        if arr.ndim == 0:
            arr = arr.reshape(1)
        ax = pick(rng, axes)
        if kind == "trunc":
            new = np.take(arr, np.arange(arr.shape[ax] - 1), axis=ax)
        else:
            one = np.zeros(arr.shape[:ax] + (1,) + arr.shape[ax + 1:], arr.dtype)
            new = np.concatenate([arr, np.take(arr, [0], axis=ax) if arr.shape[ax] else one], axis=ax)
        kind = f"{kind}{ax}"
    elif kind == "flatten":
        new = arr.reshape(-1)
    elif kind == "unsqueeze":
        new = arr[None]
    elif kind == "empty":
        new = np.zeros((0,) + arr.shape[1:], arr.dtype)
    elif kind == "scalar":
        new = arr.reshape(-1)[:1].reshape(())
    else:
        new = arr[0]
    case.inputs[name] = np.ascontiguousarray(new)
    return f"shape:{name}:{kind}"


def mutate_dtype(spec: OpSpec, case: Case, rng: np.random.Generator) -> str | None:
    """Any input recast to another element type (values converted; NaN/Inf become 0 in integer types)."""
    name = pick(rng, _present(case, spec))
    arr = case.inputs[name]
    to = pick(rng, [d for d in DTYPES if d != arr.dtype])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = np.nan_to_num(arr, posinf=0, neginf=0) if arr.dtype.kind == "f" and to.kind != "f" else arr
        case.inputs[name] = src.astype(to)
    return f"dtype:{name}:{to}"


def mutate_absent(spec: OpSpec, case: Case, rng: np.random.Generator) -> str | None:
    """A weight input left out (the "" name): legal for optional inputs, an error for required ones."""
    names = [n for n in _present(case, spec) if n != "X"]
    if not names:
        return None
    name = pick(rng, names)
    case.inputs[name] = None
    return f"absent:{name}"


def mutate_constness(spec: OpSpec, case: Case, rng: np.random.Generator) -> str | None:
    """An initializer becomes a graph input or the other way round (legal: constant and fed weights are
    validated and prepared on different paths)."""
    name = pick(rng, [n for n in _present(case, spec) if n != "X"] or [None])
    if name is None:
        return None
    case.constant ^= {name}
    return f"constness:{name}"


INT_EDGES = (0, -1, 1, 2**31 - 1, 2**31, -2**31, 2**62, 2**63 - 1, -2**63)


def mutate_attr(spec: OpSpec, case: Case, rng: np.random.Generator) -> str | None:
    """An attribute off by one, zero, negative, doubled, huge, one of the op's interesting values, dropped
    (legal where it has a default), retyped (float, string, list), or an unknown extra attribute."""
    a = pick(rng, spec.attrs)
    cur = case.attrs.get(a.name, None if a.default is REQUIRED else a.default)
    kind = pick(rng, ["perturb", "perturb", "interesting", "drop", "retype", "extra"])
    if kind == "drop":
        case.attrs.pop(a.name, None)
        return f"attr:{a.name}:drop"
    if kind == "extra":
        case.attrs["fuzz_extra"] = int(rng.integers(-5, 5))
        return "attr:extra"
    if kind == "retype" and type(cur) in (int, str):
        new = pick(rng, [float(cur) if a.kind is int else 1.0, str(cur) if a.kind is int else 7, [cur]])
    elif kind == "interesting" and a.interesting:
        new = pick(rng, a.interesting)
    elif a.kind is int and type(cur) is int:
        new = pick(rng, [cur + 1, cur - 1, -cur, 2 * cur, cur // 2, *INT_EDGES])
        new = int(np.clip(new, -2**63, 2**63 - 1))
    elif a.kind is str and type(cur) is str:
        new = pick(rng, ["", cur.upper(), cur + "x", cur[:-1], *a.interesting])
    else:
        return None
    case.attrs[a.name] = new
    return f"attr:{a.name}={new!r}"


#: name -> (weight, mutation); a mutation edits the case in place and returns its label, or None where it does
#: not apply. The runner binds ``spec`` (functools.partial), so these take the same (case, rng) as an op's own.
SHARED_MUTATIONS: dict[str, tuple[float, Callable[[OpSpec, Case, np.random.Generator], str | None]]] = {
    "special_floats": (4.0, mutate_special_floats),
    "shape": (2.0, mutate_shape),
    "dtype": (1.0, mutate_dtype),
    "absent": (0.5, mutate_absent),
    "constness": (0.5, mutate_constness),
    "attr": (2.0, mutate_attr),
}
