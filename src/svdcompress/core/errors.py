"""The errors a user can cause, under one base class, and optional dependencies.

Everything the CLI reports as one line (exit status 2) derives from ``SVDCompressError``;
anything else is a bug and keeps its traceback. The subclasses also derive from the
built-in exception a Python caller would expect (ValueError, ImportError).
"""

from __future__ import annotations

import importlib


class SVDCompressError(Exception):
    """Base of every error a user can cause: bad input, bad file, missing dependency."""


class ConfigError(SVDCompressError, ValueError):
    """An invalid setting; the message names the field."""


class FormatError(SVDCompressError, ValueError):
    """A run directory or file that is missing, incomplete, or not what svdcompress wrote."""


class DataError(SVDCompressError, ValueError):
    """Data that is missing or malformed; the message says which file and what is wrong."""


class MissingDependency(SVDCompressError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


def require(module: str, extra: str):
    """Import ``module`` or raise MissingDependency naming ``pip install 'svdcompress[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"{module.split('.')[0]} is needed for this: "
                                f"pip install 'svdcompress[{extra}]' ({err})") from None
