"""Benchmarks: each prints its figures as ratios to a baseline measured in the same run. Not tests.

Every benchmark takes ``--quick``: the same code path on tiny inputs, in seconds, so
that CI runs them all (``tests/test_benchmarks.py``) and none can rot unnoticed.
"""
from __future__ import annotations

import argparse
from typing import Any

from tasks.machine import pin_kernels

pin_kernels()  # $TRANSFERPIPE_KERNELS, as for the transferpipe command: before numpy and torch load

#: ``data:`` of the quick runs that read the digits: three classes (~540 images) instead of ten
QUICK_DIGITS: dict[str, Any] = {"source": "digits", "digits": {"classes": [0, 1, 2]}}


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, Any]) -> argparse.Namespace:
    """``parser``'s arguments plus ``--quick``, which sets ``quick``'s values where the command line did not."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny inputs, same code path: seconds (CI's smoke run); figures are not meaningful")
    args = parser.parse_args()
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args
