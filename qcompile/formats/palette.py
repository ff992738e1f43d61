"""Palettes for ``-f auto``: the per-layer settings the allocator chooses from, and the budget it fills.

A candidate is a registered format plus options, written ``FORMAT[:KEY=VALUE[:KEY=VALUE...]]`` (e.g.
``spqr-w3:bits=4``, ``int4-gptq:group_size=64``); a palette is candidates separated by commas. Every entry is
checked against the registry when the request is read, before any model is loaded. Which settings the
default palette holds is said by the registry rows themselves (:attr:`Format.palette`), so nothing here
names a format.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from qcompile.errors import FormatError
from qcompile.formats import get_format, registered
from qcompile.formats.base import Format, is_whole_model_option

#: The name ``-f`` takes for a per-layer mix of formats chosen under a budget.
AUTO = "auto"
SYNTAX = "FORMAT[:KEY=VALUE[:KEY=VALUE...]], e.g. 'spqr-w3:bits=4' or 'int4-gptq:group_size=64'"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One palette entry: a registered format and the options the entry sets (parsed, in the order given)."""

    fmt: Format
    given: tuple[tuple[str, Any], ...] = ()

    @property
    def text(self) -> str:
        """The entry as the user writes it, e.g. ``spqr-w3:bits=4``."""
        return self.fmt.name + "".join(f":{k}={v}" for k, v in self.given)

    def options(self) -> dict[str, Any]:
        """The format's options with this entry's over its defaults (what the final quantization uses)."""
        return self.fmt.resolve_options(dict(self.given))

    def estimate_options(self) -> dict[str, Any] | None:
        """Cheaper options to estimate a layer's damage with (a slow format's :attr:`Format.estimate_options`,
        under the entry's own), or ``None`` when the final options themselves are cheap enough."""
        if not self.fmt.estimate_options:
            return None
        given = dict(self.given)
        return self.fmt.resolve_options({**self.fmt.estimate_options, **given})

    def fits(self, k: int, n: int) -> bool:
        """Whether a ``K x N`` layer can take this entry (e.g. K a multiple of AQLM's group)."""
        if self.fmt.check_layer is None:
            return True
        try:
            self.fmt.check_layer(k, n, self.options())
        except FormatError:
            return False
        return True

    def __str__(self) -> str:
        return self.text


def parse_candidate(text: str) -> Candidate:
    """One palette entry; errors name the entry and what is wrong with it."""
    name, *pairs = [p.strip() for p in text.strip().split(":")]
    if not name:
        raise FormatError(f"palette entry {text!r}: expected {SYNTAX}")
    if name == AUTO:
        raise FormatError(f"palette entry {text!r}: a palette lists registered formats, not {AUTO!r}")
    try:
        fmt = get_format(name)
    except FormatError as e:
        raise FormatError(f"palette entry {text!r}: {e}") from None
    given: list[tuple[str, Any]] = []
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not raw.strip():
            raise FormatError(f"palette entry {text!r}: expected {SYNTAX}")
        if key not in fmt.options:
            raise FormatError(f"palette entry {text!r}: format {fmt.name} has no option {key}; "
                              f"accepted: {', '.join(sorted(k for k in fmt.options if not is_whole_model_option(k)))}")
        if is_whole_model_option(key):
            raise FormatError(f"palette entry {text!r}: {key} acts on the whole model, not per layer (give it with -O)")
        if any(k == key for k, _ in given):
            raise FormatError(f"palette entry {text!r}: option {key} given twice")
        try:
            given.append((key, fmt.options[key].parse(key, raw.strip())))
        except FormatError as e:
            raise FormatError(f"palette entry {text!r}: {e}") from None
    return Candidate(fmt, tuple(given))


def parse_palette(texts: Sequence[str] | str | None) -> tuple[Candidate, ...]:
    """Candidates from comma-separated entries (several strings are joined); ``None`` or empty: the default
    palette. The same setting twice is an error."""
    if isinstance(texts, str):
        texts = [texts]
    entries = [e for t in (texts or ()) for e in t.split(",")]
    if not entries:
        return default_palette()
    if any(not e.strip() for e in entries):
        raise FormatError(f"palette {','.join(entries)!r}: an empty entry (expected {SYNTAX}, separated by commas)")
    cands = tuple(parse_candidate(e) for e in entries)
    seen: dict[tuple, str] = {}
    for c in cands:
        key = (c.fmt.name, tuple(sorted(c.options().items())))
        if key in seen:
            raise FormatError(f"palette entries {seen[key]!r} and {c.text!r} are the same setting")
        seen[key] = c.text
    return cands


def default_palette() -> tuple[Candidate, ...]:
    """Every registry row's :attr:`Format.palette` settings, in registry order."""
    return tuple(Candidate(f, tuple(opts.items())) for f in registered() for opts in f.palette)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What ``-f auto`` fills: bits per weight over the quantized linears (``--budget``, counted as report.json's
    ``bits_per_weight`` counts the file's bytes), or the whole file in megabytes of 10^6 bytes (``--budget-mb``:
    model.onnx and its data, the vocabulary tables included)."""

    bits: float | None = None
    megabytes: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.bits, self.megabytes) if v is not None]
        if len(given) != 1:
            raise FormatError("-f auto needs one budget: --budget BITS (per quantized weight) or --budget-mb MB "
                              "(the whole file)")
        for flag, v in (("--budget", self.bits), ("--budget-mb", self.megabytes)):
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise FormatError(f"{flag} {v!r}: expected a positive number")
        if self.bits is not None and self.bits > 32:
            raise FormatError(f"--budget {self.bits}: more bits per weight than float32 (32)")

    @property
    def text(self) -> str:
        return f"{self.bits:g} bits/weight" if self.bits is not None else f"{self.megabytes:g} MB"
