"""Shared plumbing of the `python -m vit_jax.*` commands: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from vit_jax import hugepages
from vit_jax.errors import UserError

EXIT_BAD_INPUT = 2


def local_path(path: str) -> str:
    """`path` with a leading `~` expanded (a shell leaves it alone in --flag=~/x); URIs (gs://...) as they are."""
    return path if not path or "://" in path else os.path.expanduser(path)


def no_positional_arguments(argv: Sequence[str]) -> None:
    """Raise UserError for arguments after the program name: every input of these commands is a --flag (a stray
    word is often the rest of an unquoted path with a space, as --manual_dir=~/my images)."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}: pass options as --flag=value (quote paths "
                        "with spaces)")


def _fail(message: str) -> None:
    """The one `error:` line (a message quoting another library's text may hold newlines) and exit code 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _unknown_field(error: BaseException, argv: Sequence[str]) -> str:
    """ml_collections raises KeyError("'name'\\nDid you mean ...?"), sometimes inside an AttributeError."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    name, _, hint = str(error.args[0] if error.args else error).partition("\n")
    name = name.strip("\"'")
    given = [arg for arg in argv[1:] if name in arg.split("=")[0].lstrip("-").split(".")]
    return (f"unknown config field {name!r}" + (f" in {given[0]}" if given else "")
            + (f" ({_lower_first(hint.strip().split(' instead of ')[0])})" if hint.strip() else "")
            + "; the fields are those of the config file (see configs/common.py)")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _config_file_error(message: str) -> str:
    """A config file's get_config() failed: ml_collections puts the whole traceback in the flag error; keep the
    flag and the exception's own message (its type only when it is not one of ours)."""
    head, _, trace = message.partition("Error whilst parsing config file:")
    lines = trace.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1:] if frames else lines
    start = next((i for i, line in enumerate(after) if line and not line[0].isspace()), 0)
    error = " ".join(" ".join(after[start:]).split())
    error = re.sub(r"^vit_jax\.[\w.]*Error: ", "", error)  # ConfigError, UserError: the message says it all
    return f"{' '.join(head.split())} {error}"


def _unreadable_config_file(argv: Sequence[str], error: BaseException | None) -> str:
    args = list(argv[1:])
    path = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), "")
    if not path and "--config" in args[:-1]:  # --config FILE, two words
        path = args[args.index("--config") + 1]
    path = path.split(":", 1)[0]
    reason = str(error).strip().splitlines()[-1].strip() if error is not None and str(error).strip() else ""
    if error is not None and "No such file" not in reason:
        return f"flag --config={path}: the config file cannot be read: {reason}"
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    known = sorted(f for f in os.listdir(configs) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(configs) else []
    return (f"flag --config={path}: no such config file (in {os.getcwd()})"
            + (f"; the project's are configs/{{{','.join(known)}}}" if known else ""))


def _check_config_files_loaded(argv: Sequence[str]) -> None:
    """A config file that cannot be read is only reported when first used (ml_collections); report it now."""
    value = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if type(value).__name__ == "_ErrorConfig":  # ml_collections.config_flags' stand-in for a failed load
        _fail(_unreadable_config_file(argv, object.__getattribute__(value, "_error")))


def _installed_config(value: str) -> str:
    """`configs/X.py[:arg]` as the installed `configs` package's X.py when ./configs/X.py does not exist: after
    `pip install .`, the README's commands work from any directory (the checkout's own files win inside it)."""
    path, sep, arg = value.partition(":")
    if not path.startswith("configs/") or os.path.exists(path):
        return value
    try:
        import configs  # the package setup.py installs beside vit_jax
    except ImportError:
        return value
    candidate = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), path[len("configs/"):])
    return candidate + sep + arg if os.path.isfile(candidate) else value


def _with_installed_configs(argv: Sequence[str]) -> list[str]:
    """`argv` with its `--config` file resolved by `_installed_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + _installed_config(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = _installed_config(out[i + 1])
    return out


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing where an unknown or ill-typed flag or config override is a one-line error."""
    argv = _with_installed_configs(argv)
    try:
        rest = flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: a field the config does not have
        _fail(_unknown_field(e, argv))
    except OSError as e:  # an override touched a config file that could not be read
        _fail(_unreadable_config_file(argv, e.__cause__))
    except (flags.Error, TypeError, ValueError) as e:
        message = str(e)
        _fail(_config_file_error(message) if "Error whilst parsing config file:" in message
              else _plain_type_error(" ".join(message.split())))
    _check_config_files_loaded(argv)
    return rest


_TYPE_ERRORS = (  # absl's and ml_collections' words for a value of the wrong type -> what is valid
    (re.compile(r"\('Non-boolean argument to boolean flag', .*\)$"), "expected true or false"),
    (re.compile(r"invalid literal for int\(\) with base 10: .*$"), "expected an integer"),
    (re.compile(r"could not convert string to float: .*$"), "expected a number"),
)


def _plain_type_error(message: str) -> str:
    """`flag --config.x=v: <library wording>` with the library's wording of a type error said plainly."""
    for pattern, plain in _TYPE_ERRORS:
        found = pattern.search(message)
        if found:
            return message[:found.start()] + plain
    return message


def _without_late_loop_callbacks(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """`sys.unraisablehook` minus TensorStore's calls onto a closed event loop.

    When orbax abandons the reads of a damaged checkpoint, the reads that complete after it closed their event
    loop call `loop.call_soon_threadsafe` from TensorStore's threads. The RuntimeError("Event loop is closed") is
    reported as unraisable, with no object, while the error is on its way to the one line that says what is
    wrong. Only that error is dropped, and only when native code called asyncio directly.
    """

    def filtered(unraisable: Any) -> None:
        traceback = unraisable.exc_traceback
        if (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
                and traceback is not None and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            return
        hook(unraisable)

    return filtered


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`absl.app.run(main)`, with flag errors and `UserError`s reported in one line and exit code 2.

    First restarts the process with huge pages for XLA's per-step buffers where that helps
    (`vit_jax.hugepages`).
    """
    hugepages.restart_with_hugepages()

    def guarded(argv: Sequence[str]) -> None:
        sys.unraisablehook = _without_late_loop_callbacks(sys.unraisablehook)
        try:
            main(argv)
        except UserError as e:
            # The command ends here: errors of background work it abandons (orbax's pending reads of a damaged
            # checkpoint, collected at exit: unraisable exceptions, asyncio's "Task exception was never
            # retrieved" with a traceback, and Python's RuntimeWarning for reads never started) would only bury
            # the one line that says what is wrong.
            sys.unraisablehook = lambda unraisable: None
            logging.getLogger("asyncio").disabled = True
            warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)
            _fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)
