"""Errors a user can act on: each names the file and tensor at fault and carries an exit code.

Exit codes (``rebasin`` CLI):

====  ==========================================================================
1     unexpected internal error (a bug: please report it)
2     bad command line (argparse)
3     input file missing, unreadable, truncated or not safetensors
4     architecture mismatch: unknown family, unknown / missing / mis-shaped tensor
5     non-finite values (NaN / Inf) in an input tensor or cost matrix
6     output already exists (pass ``--overwrite``)
7     incompatible inputs: different architectures/shapes, empty task vector
8     writing the output failed (disk full, interrupted); nothing was left behind
====  ==========================================================================
"""
from __future__ import annotations


class RebasinError(Exception):
    """Base class: a clear, user-facing failure with a distinct exit code."""

    exit_code = 1

    def __init__(self, message: str, *, file: object | None = None, tensor: str | None = None) -> None:
        parts = []
        if file is not None:
            parts.append(f"{file}")
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file = file
        self.tensor = tensor


class InputFileError(RebasinError):
    exit_code = 3


class ArchitectureError(RebasinError):
    exit_code = 4


class NonFiniteError(RebasinError):
    exit_code = 5


class OutputExistsError(RebasinError):
    exit_code = 6


class IncompatibleInputsError(RebasinError):
    exit_code = 7


class WriteError(RebasinError):
    exit_code = 8
