"""Shared plumbing of the `python -m vit_jax.*` commands: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from vit_jax import hugepages
from vit_jax.errors import UserError

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing where an unknown or ill-typed flag or config override is a one-line error."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: a field the config does not have
        name = str(e.args[0] if e.args else e).strip("\"'")
        given = [arg for arg in argv[1:] if name in arg.split("=")[0].lstrip("-").split(".")]
        _fail(f"unknown config field {name!r}" + (f" in {given[0]}" if given else "")
              + "; the fields are those of the config file (see configs/common.py)")
    except (flags.Error, TypeError, ValueError) as e:
        _fail(" ".join(str(e).split()))
    raise AssertionError("unreachable")


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`absl.app.run(main)`, with flag errors and `UserError`s reported in one line and exit code 2.

    First restarts the process with huge pages for XLA's per-step buffers where that helps
    (`vit_jax.hugepages`).
    """
    hugepages.restart_with_hugepages()

    def guarded(argv: Sequence[str]) -> None:
        try:
            main(argv)
        except UserError as e:
            _fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)
