"""Benchmarks on the command line: ``dtg bench reproduce`` (paper tables over seeds), ``dtg bench migrate`` (its cache), ``dtg bench speed`` and ``dtg bench targets``;
beside them :mod:`dtg.bench.explain`, the diagnostic figure of ``dtg explain``.

Only argparse is imported here; each command imports torch and friends when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` with its ``reproduce`` and ``speed`` subcommands on ``dtg``'s subparsers."""
    from dtg.bench import reproduce, speed, targets

    p = subparsers.add_parser("bench", help="benchmarks: reproduce (paper tables over seeds), migrate (its cache to new run "
                                            "keys), speed (timings), targets (target quality)")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    reproduce.add_parser(sub)
    reproduce.add_migrate_parser(sub)
    speed.add_parser(sub)
    targets.add_parser(sub)
    return p

