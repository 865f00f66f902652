"""The base class of errors caused by the user's input (config, files, data), reported in one line; and what a
storage failure (a full disk, a denied write) says, whichever library reported it."""

from __future__ import annotations

import re


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
    seen, visited = error, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and any_os_error:
            return " ".join(str(seen).split())
        found = _STORAGE_FAILURE.search(str(seen))
        if found:
            message = " ".join(str(seen).split())
            return f"{found.group(0)} ({message[:200]}{' ...' if len(message) > 200 else ''})"
        seen = seen.__cause__ or seen.__context__
    return None
