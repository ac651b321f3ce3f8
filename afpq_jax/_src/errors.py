"""The exceptions afpq-jax raises on purpose.

Every error that bad input can cause (an argument, an option, a rules file, a model or checkpoint on disk) is an
`AfpqError` whose message names the problem and the fix. The command-line tools print those as one line and exit
with status 2; any other exception is a bug and keeps its traceback (exit status 1). Each class also derives from
the built-in exception a Python caller would expect (``ValueError``, ``TypeError``, ...), so ``except ValueError``
keeps working.
"""

from __future__ import annotations


class AfpqError(Exception):
    """Base class of the errors afpq-jax raises on purpose (user-facing, one-line messages)."""


class InputError(AfpqError, ValueError):
    """An argument, option or input file is invalid."""


class ArgumentTypeError(InputError, TypeError):
    """An argument has the wrong type (e.g. an integer weight where a float one is needed)."""


class CheckpointError(InputError):
    """A model or checkpoint on disk is missing, damaged, or does not match its config."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A file or directory the caller named does not exist."""


class OutputExistsError(InputError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class NotExportable(InputError):
    """A layer's scheme has no exact form in the export format asked for (the message says why and names the
    layers)."""


class QuantizationError(AfpqError, ArithmeticError):
    """A method could not produce a valid result for a layer (e.g. GPTQ's Hessian is not positive definite at any
    damping tried); the message names the layer and what to change."""


class AssetError(AfpqError, RuntimeError):
    """The built-in model or text could not be fetched from PyPI or does not match its pinned checksum."""


class OutputError(AfpqError, OSError):
    """An output cannot be written as asked: it would hold or replace a user's files, its directory is not
    writable, or the disk is full; the message names the path and what to do."""


class OutputBusyError(OutputError):
    """Another afpq-jax run is writing the same output path right now."""


class NoSpaceError(OutputError):
    """The device of an output ran out of space; the message names the path and the bytes needed."""
