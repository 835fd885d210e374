"""The orders benchmark: a closed-loop load generator, a grpclib baseline, and a report.

Run it as ``python -m bench`` (see ``bench/README.md``). :func:`main` is the whole command line, so a
front end such as ``orders bench`` can hand its arguments straight to it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    """Run the benchmark with command-line ``argv`` (None: ``sys.argv[1:]``); return the exit status.
    ``prog``: the command's name in its usage and error messages."""
    from bench.run import main as run_main  # lazy: ``python -m bench.baseline`` need not import orders

    return run_main(argv, prog)
