"""Built-in weight formats. Importing this package registers them all."""
from qcompile.formats import integer  # noqa: F401
from qcompile.formats import fp4  # noqa: F401
from qcompile.formats import spqr  # noqa: F401
from qcompile.formats import codebook  # noqa: F401
from qcompile.formats.base import Format, QuantizedWeight, all_formats, get_format  # noqa: F401
