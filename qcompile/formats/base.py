"""The contract every weight format implements.

A format turns one float weight (ONNX MatMul layout, ``[K, N]``: K inputs, N outputs) plus an optional
calibration Hessian ``H = XᵀX`` (``[K, K]``) into a :class:`QuantizedWeight`.  The quantized weight knows
how to dequantize itself (for ``--emit simulated`` and for error reports), which tensors its native op
stores (size truth is counted from exactly these bytes), and how to lower itself to ONNX nodes.

A :class:`Format` is the one table row that describes a format to the rest of the program (in the spirit of
ggml's per-type traits table): its options, weight class, op and numpy reference, tunable tensors and bench
cases. Each format package (``qcompile/formats/<name>/``) lists its rows in ``FORMATS``; the registry in
:mod:`qcompile.formats` is the only place that names the packages.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from qcompile.errors import FormatError
from qcompile.solvers import distill

EMIT_MODES = ("native", "simulated", "portable")


@dataclasses.dataclass
class Lowered:
    """ONNX nodes and initializers that replace one MatMul (input name -> output name)."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    opset_imports: dict[str, int] = dataclasses.field(default_factory=dict)


class QuantizedWeight(ABC):
    """One quantized linear weight. Shape is the ONNX MatMul weight shape ``[K, N]``."""

    format_name: str = "?"

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(K, N)``: input features, output features."""

    @abstractmethod
    def dequantize(self) -> np.ndarray:
        """The float weight the format represents, ``[K, N]`` float32 (ONNX MatMul layout)."""

    @abstractmethod
    def packed(self) -> dict[str, np.ndarray]:
        """Exactly the tensors the native op stores for this weight (codes, scales, zeros, ...)."""

    @abstractmethod
    def lower_native(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        """Nodes computing ``y = x @ W`` with the format's native op; ``dtype`` is the onnx activation type."""

    def lower_portable(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        """Standard-ONNX-only lowering (dequantize in-graph, then MatMul). Formats override this."""
        raise FormatError(f"format {self.format_name} has no portable lowering")

    def stored_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.packed().values()))

    def bits_per_weight(self) -> float:
        k, n = self.shape
        return 8.0 * self.stored_bytes() / (k * n)

    def extra_report(self) -> dict[str, Any]:
        """Format-specific per-layer facts for report.json (e.g. outlier rate)."""
        return {}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A condition an option value must meet, and the words the error uses for it."""

    holds: Callable[[Any], bool]
    expected: str


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"at least {low}")


def positive() -> Rule:
    return Rule(lambda v: v > 0, "positive")


def power_of_two(low: int) -> Rule:
    return Rule(lambda v: v >= low and v & (v - 1) == 0, f"a power of two, at least {low}")


def multiple_of(step: int) -> Rule:
    return Rule(lambda v: v > 0 and v % step == 0, f"a positive multiple of {step}")


def between(low: float, high: float) -> Rule:
    return Rule(lambda v: low <= v <= high, f"in {low}..{high}")


@dataclasses.dataclass(frozen=True)
class Option:
    """One format option: its type, default, help text and the rule its value must meet. CLI and API share
    this table, and every value is checked when the request is read, before any model is loaded."""

    type: type
    default: Any
    help: str
    choices: tuple | None = None
    rule: Rule | None = None

    def parse(self, name: str, raw: Any) -> Any:
        try:
            if self.type is bool and isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value: Any = low in ("1", "true", "yes", "on")
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise FormatError(f"option {name}={raw!r}: expected {self.type.__name__}") from None
        if self.type is float and value != value:
            raise FormatError(f"option {name}={raw!r}: expected a number, not NaN")
        if self.choices is not None and value not in self.choices:
            raise FormatError(f"option {name}={value!r}: expected one of {', '.join(map(str, self.choices))}")
        if self.rule is not None and not self.rule.holds(value):
            raise FormatError(f"option {name}={value!r}: expected {self.rule.expected}")
        return value


QuantizeFn = Callable[..., QuantizedWeight]


def accuracy_level_option() -> Option:
    """The ``accuracy_level`` option of the formats whose ops take the attribute (docs/ops.md, "Conventions"):
    it sets the node attribute and changes no weight."""
    return Option(int, 0, "activation arithmetic the ops may use, MatMulNBits' scale: 0 default, 1 fp32 only, "
                  "4 int8 activations / lookup tables on CPU (docs/ops.md)", choices=(0, 1, 2, 3, 4))


def set_accuracy_level(qw: QuantizedWeight, level: int) -> QuantizedWeight:
    """``qw`` lowered with ``accuracy_level=level`` (the weight itself is unchanged)."""
    qw.accuracy_level = int(level)  # type: ignore[attr-defined]
    return qw

#: Options whose name starts with this act on the whole model after every layer is quantized (fine-tuning);
#: they cannot differ per layer and do not change any layer's own result.
WHOLE_MODEL_PREFIX = "finetune"


def is_whole_model_option(key: str) -> bool:
    return key.startswith(WHOLE_MODEL_PREFIX)


def finetune_options(epochs: float = distill.DEFAULT_EPOCHS, lr: float = 1e-3, scale_lr: float | None = None,
                     windows: int = distill.DEFAULT_WINDOWS, norm_lr: float = distill.DEFAULT_NORM_LR) -> dict[str, Any]:
    """The ``finetune_*`` options every tunable format shares (defaults per format); they configure
    the tune pass (:func:`qcompile.solvers.distill.tune_modules`)."""
    opts = {
        "finetune_epochs": Option(float, epochs, rule=at_least(0), help="after all layers: epochs of tuning the format's float side "
                                  "parameters (codes fixed) against the float model's next-token distribution "
                                  "(0 = off; needs a transformers-loadable source)"),
        "finetune_lr": Option(float, lr, "Adam learning rate of the tuned side parameters", rule=positive()),
        "finetune_batch": Option(int, 4, "windows per fine-tuning step", rule=at_least(1)),
        "finetune_norm_lr": Option(float, norm_lr, rule=at_least(0), help="> 0: fine-tuning also adjusts the RMSNorm weights (float) "
                                   "with this Adam learning rate"),
        "finetune_windows": Option(int, windows, rule=at_least(0), help="windows of calibration-split text to tune on, drawn with another "
                                   "seed than the Hessian windows (0 = the calibration windows themselves)"),
    }
    if scale_lr is not None:
        opts["finetune_scale_lr"] = Option(float, scale_lr, "Adam learning rate of the (relative) scale parameters",
                                           rule=positive())
    return opts


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Format options for the layers whose names match ``pattern`` (shell-style, e.g. ``*.v_proj``).

    Why: layers differ in how much their error costs the model (a small model's attention value projections
    cost far more than its MLP weights at the same bits), so a format's bit budget is best spent unevenly."""

    pattern: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def parse(cls, text: str) -> "LayerOverride":
        """``PATTERN:KEY=VALUE[,KEY=VALUE...]`` (the CLI's ``--layer-option``)."""
        pattern, sep, rest = text.partition(":")
        pairs = [p.strip() for p in rest.split(",") if p.strip()]
        if not sep or not pattern.strip() or not pairs or any("=" not in p for p in pairs):
            raise FormatError(f"layer option {text!r}: expected PATTERN:KEY=VALUE[,KEY=VALUE...], "
                              "e.g. '*.v_proj:bits=4'")
        return cls(pattern.strip(), tuple(tuple(p.split("=", 1)) for p in pairs))  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.pattern}:" + ",".join(f"{k}={v}" for k, v in self.options)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """The ONNX op a format's native lowering emits, and the numpy reference every kernel is tested against:
    ``reference(x, *inputs, **attributes)`` takes the node's inputs after X in node order and its attributes."""

    domain: str
    type: str
    reference: Callable[..., np.ndarray]
    needs_library: bool  # True: our qcompile_ops library must be registered; False: stock onnxruntime runs it
    inputs: tuple[str, ...] = ()  # the stored-tensor inputs after X, in node order (docs/ops.md names them)
    fuzz: Any = None  # the op's fuzz cases (qcompile.fuzz.case.OpSpec, from the format's fuzz.py), for our ops

    @property
    def runtime(self) -> str:
        where = "qcompile_ops" if self.needs_library else "stock onnxruntime"
        return f"{where} ({self.domain}.{self.type})"


@dataclasses.dataclass(frozen=True)
class Format:
    """A registered weight format, e.g. ``int4-gptq``. Names follow ``<grid>-<method>``."""

    name: str
    description: str
    quantize: QuantizeFn  # quantize(weight[K,N] float32, hessian[K,K] torch|None, **options) -> QuantizedWeight
    options: dict[str, Option]
    needs_calibration: bool
    weight: type[QuantizedWeight]  # what quantize returns
    op: OpSpec  # what the native emit writes
    emits: tuple[str, ...] = ("native", "simulated")
    default_emit: str = "native"
    # Fine-tuning hooks (the tune pass, qcompile.passes.tune): ``to_module(qw)`` is a
    # :class:`qcompile.solvers.distill.TunableLinear` that decodes the weight differentiably in its float side
    # parameters, ``from_module(qw, tuned module)`` the packed weight holding the tuned values. The tune pass builds
    # one module per layer of every format that has them, so a file mixing formats is distilled once, jointly.
    to_module: Callable[[QuantizedWeight], "distill.TunableLinear"] | None = None
    from_module: Callable[[QuantizedWeight, "distill.TunableLinear"], QuantizedWeight] | None = None
    # Packed tensors fine-tuning may change (float side parameters); every other tensor, and so the file layout and
    # size, stays byte for byte as the layer-wise method left it (the tune pass checks this).
    tunable: tuple[str, ...] = ()
    # Op benchmark columns for ``qcompile bench`` (qcompile.bench.BenchOp); formats sharing an op share them.
    bench: tuple[Any, ...] = ()
    # Calibration windows when the user names none (--calib-samples): a format measured to gain from more
    # calibration text (SpQR) takes more than the cheap default.
    calib_samples: int = 64
    # Per-layer defaults of a preset (e.g. more bits for attention value projections); user overrides
    # (--layer-option) come after these.
    layer_options: tuple[LayerOverride, ...] = ()
    # How the vocabulary tables are stored when the user names none (--embeddings): a format that aims at a size
    # class stores them at a matching width (see qcompile.passes.embeddings).
    embeddings: str = "int8"
    # The settings this row offers ``-f auto``'s default palette (each a dict of options over the defaults; none: the
    # row is not in it). Only settings worth choosing per layer: useful widths and groups that run natively.
    palette: tuple[dict[str, Any], ...] = ()
    # A slow format's cheaper options for estimating a layer's damage while ``-f auto`` allocates (the chosen layers
    # are then quantized with the full options), and the measured ratio of the full options' output error to the
    # cheap ones', by which the estimate is multiplied.
    estimate_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    estimate_error_ratio: float = 1.0
    # check_layer(K, N, layer's options) raises FormatError when a layer of that shape cannot take these options
    # (e.g. K not a multiple of a group): run over every layer right after discovery, before calibration.
    check_layer: Callable[[int, int, dict[str, Any]], None] | None = None

    @property
    def runtime(self) -> str:
        """What the native emit needs to run."""
        return self.op.runtime

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown keys are an error naming the accepted ones."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise FormatError(
                f"format {self.name} has no option {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(self.options)) or '(none)'}"
            )
        out = {k: o.default for k, o in self.options.items()}
        for k, v in given.items():
            out[k] = self.options[k].parse(k, v)
        return out

    def parse_layer_override(self, ov: LayerOverride) -> dict[str, Any]:
        """An override's options parsed with this format's option types; unknown keys and whole-model
        options are errors (checked before any work, so a typo fails at once)."""
        for k, _ in ov.options:
            if k not in self.options:
                raise FormatError(f"layer option {ov}: format {self.name} has no option {k}; "
                                  f"accepted: {', '.join(sorted(self.options))}")
            if is_whole_model_option(k):
                raise FormatError(f"layer option {ov}: {k} acts on the whole model, not per layer")
        return {k: self.options[k].parse(k, raw) for k, raw in ov.options}

    def resolve_layer_options(self, base: dict[str, Any], overrides: Sequence[LayerOverride],
                              layer_names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each layer's options: ``base`` (from :meth:`resolve_options`), then every override whose pattern
        matches the layer's name, in order (a later one wins). The format's own :attr:`layer_options` come
        first and may match nothing (they name layers of common architectures); a given pattern that
        matches no layer is an error."""
        names = list(layer_names)
        out = {n: dict(base) for n in names}
        for ov, own in [(o, True) for o in self.layer_options] + [(o, False) for o in overrides]:
            parsed = self.parse_layer_override(ov)
            matched = fnmatch.filter(names, ov.pattern)
            if not matched and not own:
                example = names[0] if names else "(none)"
                raise FormatError(f"layer option {ov}: pattern {ov.pattern!r} matches no quantized layer "
                                  f"(names look like {example!r})")
            for n in matched:
                out[n].update(parsed)
        return out
