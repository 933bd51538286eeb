"""Where a results file came from: the command, the machine and the date, stamped into the
JSON by every benchmark when it writes it, and printed above every table rendered from it
(benchmarks/render.py)."""

from __future__ import annotations

import os
import shlex
import sys
import time

from svdcompress.core.devices import machine


def stamp(result: dict, threads: int | None = None, variation: str | None = None,
          earlier: str | None = None) -> dict:
    """``result`` with its provenance: the command that ran (this process's arguments), the
    machine and today's date; ``variation``: how much the figures varied between runs,
    where that was measured; ``earlier``: the commands that made the file's earlier rows,
    when this run adds to it (the provenance then names them all)."""
    command = "python " + " ".join(shlex.quote(a) for a in [_script()] + sys.argv[1:])
    command = f"{earlier}; then {command}" if earlier else command
    old = result.get("provenance", {})
    result["provenance"] = {"command": command, "date": time.strftime("%Y-%m-%d"),
                            "machine": machine(threads),
                            **({"variation": variation or old["variation"]}
                               if variation or old.get("variation") else {})}
    return result


def _script() -> str:
    path = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmarks/?"
    return path if path.startswith("benchmarks") else os.path.join("benchmarks", os.path.basename(path))
