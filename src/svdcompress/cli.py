"""The command line: argument parsing only; each sub-command is a thin call into the API.

Errors a user can cause end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def cmd_info(args) -> None:
    from .io import load, read_meta

    meta = read_meta(args.run)
    if meta.get("architecture") is not None:
        load(args.run)  # checks every tensor against the recorded shapes
    print(f"run: {args.run}  (format_version {meta['format_version']})")
    if meta.get("architecture"):
        print(f"architecture: {meta['architecture']}")
    if meta.get("config"):
        print(f"config: {meta['config']}")
    for e in meta["layers"]:
        print(f"  {e['name']:<28} {e.get('kind', '?'):<8} rank {e.get('rank')}")
    if not meta["layers"]:
        print("  (no low-rank layers: a dense model)")


def build_parser() -> Parser:
    p = Parser(prog="svdcompress", description="Low-rank (truncated SVD) compression of "
               "PyTorch models: compress, fine-tune, train with projected weights, report.")
    p.add_argument("--version", action="version", version=f"svdcompress {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    s = sub.add_parser("info", help="describe a saved run directory (and check its files)")
    s.add_argument("run", help="run directory (model.safetensors + svdcompress.json)")
    s.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.func(args)
    except UsageError as err:
        print(f"svdcompress: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # user-caused: bad value, bad or missing file
        print(f"svdcompress: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdcompress: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
