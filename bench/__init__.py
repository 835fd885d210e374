"""The orders benchmark: a closed-loop load generator, a grpclib baseline, and a report.

Run it as ``python -m bench`` (see ``bench/README.md``). :func:`main` is the whole command line, so a
front end such as ``orders bench`` can hand its arguments straight to it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv`` (None: ``sys.argv[1:]``); return the exit status."""
    from bench.run import main as run_main  # lazy: ``python -m bench.baseline`` need not import orders

    return run_main(argv)
