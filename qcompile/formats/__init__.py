"""The format registry: the one place that lists the format packages.

Each package ``qcompile/formats/<name>/`` holds everything of one format family (numerics, packed weight and
lowerings, numpy reference op, fine-tuning hooks, bench cases, presets) and exposes its table rows as
``FORMATS``. The pipeline, the CLI, ``qcompile bench`` and the tests read the rows from here; adding a format
is its package plus one line in :data:`PACKAGES`.
"""
from __future__ import annotations

import functools
import importlib

from qcompile.errors import FormatError
from qcompile.formats.base import Format, LayerOverride, OpSpec, QuantizedWeight

#: Format packages, in the order ``qcompile formats`` lists them.
PACKAGES = ("integer", "fp4", "spqr", "aqlm")


@functools.cache
def _registry() -> dict[str, Format]:
    table: dict[str, Format] = {}
    for package in PACKAGES:
        for fmt in importlib.import_module(f"qcompile.formats.{package}").FORMATS:
            if fmt.name in table:
                raise ValueError(f"format {fmt.name} registered twice")
            table[fmt.name] = fmt
    return table


def register(fmt: Format) -> Format:
    """Add a format that lives outside the built-in packages (a plugin, or a test's wrapper format)."""
    table = _registry()
    if fmt.name in table:
        raise ValueError(f"format {fmt.name} registered twice")
    table[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    try:
        return _registry()[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; accepted: {', '.join(sorted(_registry()))}") from None


def all_formats() -> list[Format]:
    """Every registered format, sorted by name."""
    return [f for _, f in sorted(_registry().items())]


def registered() -> list[Format]:
    """Every registered format in registry order (package by package, each package's rows in its order)."""
    return list(_registry().values())


def bench_cases() -> list:
    """The op benchmark columns of every format (each once, in registry order)."""
    seen: dict[str, object] = {}
    for fmt in _registry().values():
        for case in fmt.bench:
            seen.setdefault(case.name, case)
    return list(seen.values())


__all__ = ["PACKAGES", "Format", "LayerOverride", "OpSpec", "QuantizedWeight", "all_formats", "bench_cases",
           "get_format", "register", "registered"]
