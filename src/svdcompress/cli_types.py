"""The command line's argument types, and a parser whose usage errors are one line."""

from __future__ import annotations

import argparse
import os
import sys

from .core.devices import resolve_device
from .core.errors import ConfigError, SVDCompressError


class UsageError(SVDCompressError):
    """A command line that does not make sense (argparse's errors included)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def closed_pipe() -> int:
    """Status 0 once the reader of standard output went away (`svdcompress info RUN | head`):
    what is left to write goes to /dev/null, so no second error comes at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2^32 - 1 (what every command's seed takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"a seed must be from 0 to 2^32 - 1, got {text}")
    return value


def _number(text: str, ok, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # fails every check below
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    return _number(text, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "a positive number")


def rank_list(text: str) -> list:
    """"10,20,full" -> [10, 20, None]"""
    ranks = []
    for part in text.split(","):
        part = part.strip()
        ranks.append(None if part == "full" else positive_int(part))
    return ranks


def suffixes_or_regex(text: str):
    """A comma-separated list of name suffixes, or a regex when it has regex characters."""
    return text if any(c in text for c in "\\^$*+?()[]{}|") else [s for s in text.split(",") if s]


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N, and present on this machine (core.devices)."""
    try:
        resolve_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def or_default(value, default):
    """``value``, or ``default`` where the command line left it unset (None)."""
    return default if value is None else value
