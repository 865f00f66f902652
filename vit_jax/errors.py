"""The base class of errors caused by the user's input (config, files, data), reported in one line; and what a
storage failure (a full disk, a denied write) says, whichever library reported it."""

from __future__ import annotations

import re
from collections.abc import Iterator


class UserError(Exception):
    """Bad input: a config that cannot work, a missing dataset, a foreign or mismatched file.

    Command-line entry points (`vit_jax.cli.run`) print its message on one line and exit with code 2.
    """


# A full disk or a denied write, in the words of TensorStore (orbax's array writer: a ValueError) and safetensors
# (a SafetensorError), which are no OSError.
_STORAGE_FAILURE = re.compile(r"No space left on device|Permission denied|Read-only file system|Disk quota exceeded")


def storage_failure(error: BaseException, any_os_error: bool = True) -> str | None:
    """What failed in the storage under `error` (its causes and contexts too): an OSError (with `any_os_error`;
    else only as below: where reads fail too, a missing input is no storage failure), or a full disk / denied
    write that TensorStore, safetensors or TFDS report as their own errors (the OS's words, then the start of
    theirs); None for any other error."""
    for seen in causes(error):
        if isinstance(seen, OSError) and any_os_error:
            return " ".join(str(seen).split())
        found = _STORAGE_FAILURE.search(str(seen))
        if found:
            message = " ".join(str(seen).split())
            return f"{found.group(0)} ({message[:200]}{' ...' if len(message) > 200 else ''})"
    return None


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then the exception it was raised from or while handling (`__cause__`, else `__context__`), and so
    on, each once: libraries re-raise an error as their own inside `except`, and the one that says what happened
    may be any of them."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
