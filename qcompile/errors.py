"""User-facing errors: anything raised as QCompileError is printed as one line by the CLI."""


class QCompileError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class UnsupportedModelError(QCompileError):
    """The model source is not one of the accepted kinds, or has nothing to quantize."""


class CalibrationError(QCompileError):
    """Calibration text is missing, empty or too short."""


class FormatError(QCompileError):
    """Unknown format name or a bad format option."""
