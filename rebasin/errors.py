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
8     writing the output failed (disk full, unwritable path); nothing was left behind
130   interrupted (Ctrl-C); nothing was left behind
====  ==========================================================================
"""
from __future__ import annotations

EXIT_CODES_HELP = """exit codes: 0 ok, 1 internal error (a bug), 2 bad usage or option value, 3 bad input file,
4 architecture mismatch, 5 NaN/Inf, 6 output exists, 7 incompatible inputs or refused (no gain,
over the memory budget), 8 write failed, 130 interrupted; after any failure nothing is left behind"""


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


class RefusedError(RebasinError):
    """A guard the user set refused the job (``--require-gain``, the memory budget)."""

    exit_code = 7


class WriteError(RebasinError):
    exit_code = 8
