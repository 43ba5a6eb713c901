"""The ``abmll`` command line: fetch, train, evaluate, compare, demo, tune, export-peft, export-merged, plan.

Every error caused by bad input is printed as one line naming the file, field or option at fault, and the
command exits with status 2; nothing that looks complete is left behind. One module per group of commands;
what they share is in :mod:`abmll.cli.common`.
"""

from __future__ import annotations

import sys

# Each module registers its commands; --help lists them in this order.
# isort: off
from abmll.cli import training  # noqa: F401
from abmll.cli import evaluating  # noqa: F401
from abmll.cli import comparing  # noqa: F401
from abmll.cli import exporting  # noqa: F401

# isort: on
from abmll.cli.common import Budget, ConfigPreset, ReportTo, app

__all__ = ["Budget", "ConfigPreset", "ReportTo", "app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="abmll")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
