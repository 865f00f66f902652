"""Shared plumbing of the `python -m vit_jax.*` commands: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import ml_collections
from absl import app, flags

from vit_jax import hugepages
from vit_jax.errors import UserError, causes

EXIT_BAD_INPUT = 2


def local_path(path: str) -> str:
    """`path` with a leading `~` expanded (a shell leaves it alone in --flag=~/x); URIs (gs://...) as they are."""
    return path if not path or "://" in path else os.path.expanduser(path)


def checkpoint_path(value: str | None) -> str:
    """The path of a --checkpoint flag (`local_path`); UserError for an empty or blank one, which would otherwise
    be read as the current directory or reported as a file named ''."""
    if value is None or not value.strip():  # in words: the one-line error collapses the spaces of a blank value
        raise UserError(f"--checkpoint is {'blank (only whitespace)' if value else 'empty'}: expected a training "
                        "workdir, its checkpoints/ directory or a checkpoint (.npz, .safetensors, HF or orbax)")
    return local_path(value)


def naming_checkpoint_flag(message: str, path: str) -> str:
    """A checkpoint reader's `message` about `path` (most begin with the path: "PATH: no such file") as one naming
    the --checkpoint flag it came from, so it does not read as being about an image or another input."""
    if message.startswith("--checkpoint="):
        return message
    if path and message.startswith(path) and message[len(path):len(path) + 1] in (":", " "):
        return f"--checkpoint={path}{message[len(path):]}"
    return f"--checkpoint={path}: {message}"


@contextlib.contextmanager
def checkpoint_errors(path: str) -> Iterator[None]:
    """Re-raise a checkpoint reader's CheckpointError about `path` as a UserError naming the --checkpoint flag
    (`naming_checkpoint_flag`)."""
    from vit_jax.interop import CheckpointError  # the readers' error: only where a checkpoint is read

    try:
        yield
    except CheckpointError as e:
        raise UserError(naming_checkpoint_flag(str(e), path)) from e


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
    """ml_collections raises KeyError("'name'\\nDid you mean ...?"), sometimes inside an AttributeError.

    A field no --config.<field> override names is not the command line's: the config file failed on it.
    """
    error = _innermost(error)
    name, _, hint = str(error.args[0] if error.args else error).partition("\n")
    name = name.strip("\"'")
    given = [arg for arg in argv[1:] if name in arg.split("=")[0].lstrip("-").split(".")]
    if not given:
        return f"flag --config={_config_flag(argv)}: the config file failed: {type(error).__name__}: {_text(error)}"
    return (f"unknown config field {name!r} in {given[0]}"
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


def _config_flag(argv: Sequence[str]) -> str:
    """The value of --config (FILE[:ARG]) in `argv`, '' without one."""
    args = list(argv[1:])
    value = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), "")
    if not value and "--config" in args[:-1]:  # --config FILE, two words
        value = args[args.index("--config") + 1]
    return value


def _innermost(error: BaseException) -> BaseException:
    """The exception `error` wraps as its argument (ml_collections: AttributeError(KeyError(...))), or itself."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error


def _text(error: BaseException) -> str:
    """An exception's message: a SyntaxError's without its position, a KeyError's unquoted, a wrapped one's own."""
    error = _innermost(error)
    if isinstance(error, SyntaxError):
        return str(error.msg)
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


def _frames(traceback: TracebackType | None) -> Iterator[TracebackType]:
    while traceback is not None:
        yield traceback
        traceback = traceback.tb_next


def _same_file(name: str | None, path: str) -> bool:
    try:
        return bool(name) and os.path.samefile(name, path)
    except OSError:  # "<string>", a file since removed
        return False


def _config_file_position(error: BaseException, path: str) -> str | None:
    """' at line N' of the config file `path` where `error` was raised (its innermost frame there, or a SyntaxError's
    line in it), '' without a line number, None when the error went through none of its code."""
    if isinstance(error, SyntaxError) and _same_file(error.filename, path):
        return f" at line {error.lineno}" if error.lineno else ""
    lines = [frame.tb_lineno for frame in _frames(error.__traceback__)
             if _same_file(frame.tb_frame.f_code.co_filename, path)]
    return f" at line {lines[-1]}" if lines else None


def _raised_by_config_file(error: BaseException | None, argv: Sequence[str]) -> str | None:
    """The one line for an exception the config file's own code raised (compiling it, importing its modules,
    running get_config), None for any other.

    ml_collections and absl re-raise some errors as their own (`raise ... ` inside `except`): the exceptions they
    were raised in handling are searched too. Names the file, the line, the exception's type and message; for
    our own errors (UserError) the message alone, which says what is wrong.
    """
    flag = _config_flag(argv)
    path = flag.split(":", 1)[0]
    for each in causes(error) if path else ():
        where = _config_file_position(each, path)
        if where is not None:
            if isinstance(each, UserError):
                return f"flag --config={flag}: {_text(each)}"
            return f"flag --config={flag}: the config file failed{where}: {type(each).__name__}: {_text(each)}"
    return None


def _unreadable_config_file(argv: Sequence[str], error: BaseException | None) -> str:
    path = _config_flag(argv).split(":", 1)[0]
    reason = str(error).strip().splitlines()[-1].strip() if error is not None and str(error).strip() else ""
    if error is not None and "No such file" not in reason:
        return f"flag --config={path}: the config file cannot be read: {reason}"
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    known = sorted(f for f in os.listdir(configs) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(configs) else []
    return (f"flag --config={path}: no such config file (in {os.getcwd()})"
            + (f"; the project's are configs/{{{','.join(known)}}}" if known else ""))


def _not_a_config_file(error: BaseException | None, argv: Sequence[str]) -> str | None:
    """The one line for a --config file Python cannot compile as text (a binary file, an .npz given as the config):
    the SyntaxError compiling its bytes names no file and no line. None for any other error."""
    flag = _config_flag(argv)
    path = flag.split(":", 1)[0]
    for each in causes(error) if path else ():
        if isinstance(each, SyntaxError) and (
                (each.filename is None and os.path.isfile(path))  # "source code string cannot contain null bytes"
                or (_same_file(each.filename, path) and str(each.msg).startswith("(unicode error)"))):
            return f"flag --config={flag}: not a Python config file (SyntaxError: {_text(each)})"
    return None


def _kind_of(value: Any) -> str:
    """`None`, `a dict`, `an int`: what a value is, in words."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _loaded_config(flag: str) -> Any:
    """What the config file `flag` (FILE[:ARG]) returns, loaded again: when a --config.x override fails, the flag's
    parsing (which applies the overrides) failed and left it unset. A ConfigDict when it cannot be loaded."""
    from ml_collections.config_flags import config_flags  # the module: its parser is not exported

    absl_logger = logging.getLogger("absl")
    disabled, absl_logger.disabled = absl_logger.disabled, True  # its warning for None was logged the first time
    try:
        return config_flags.ConfigFileFlagParser("config", lock_config=False).parse(flag)
    except Exception:  # the config file's own code raises anything: the error already being reported says it
        return ml_collections.ConfigDict()
    finally:
        absl_logger.disabled = disabled


def _config_not_a_config_dict(argv: Sequence[str]) -> str | None:
    """The one line for a --config file whose get_config() returned something other than a ConfigDict (None: a
    forgotten return; a plain dict), None when --config was not given or holds a ConfigDict."""
    flag = _config_flag(argv)
    if "config" not in flags.FLAGS or not flag:
        return None
    value = flags.FLAGS["config"].value if flags.FLAGS["config"].present else _loaded_config(flag)
    if type(value).__name__ == "_ErrorConfig" or isinstance(value, ml_collections.ConfigDict):
        return None
    hint = " (a missing return statement?)" if value is None else ""
    return f"flag --config={flag}: get_config() returned {_kind_of(value)}{hint}: expected an ml_collections.ConfigDict"


def _check_config_files_loaded(argv: Sequence[str]) -> None:
    """A config file that cannot be read is only reported when first used (ml_collections); report it now. So is
    one whose get_config() returned no ConfigDict (ml_collections only logs a warning for None)."""
    value = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if type(value).__name__ == "_ErrorConfig":  # ml_collections.config_flags' stand-in for a failed load
        error = object.__getattribute__(value, "_error")
        _fail(_raised_by_config_file(error, argv) or _unreadable_config_file(argv, error))
    message = _config_not_a_config_dict(argv)
    if message is not None:
        _fail(message)


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
    except Exception as e:  # a config file's own code raises anything
        message = (_not_a_config_file(e, argv) or _raised_by_config_file(e, argv) or _config_not_a_config_dict(argv)
                   or _flag_error(e, argv))
        if message is None:
            raise
        _fail(message)
    _check_config_files_loaded(argv)
    return rest


def _flag_error(error: Exception, argv: Sequence[str]) -> str | None:
    """The one line for a flag or config override that parsing refused, None for an error of another kind."""
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: a field the config does not have
        return _unknown_field(error, argv)
    if isinstance(error, OSError):  # an override touched a config file that could not be read
        return _unreadable_config_file(argv, error.__cause__)
    if isinstance(error, (flags.Error, TypeError, ValueError)):
        message = str(error)
        return (_config_file_error(message) if "Error whilst parsing config file:" in message
                else _plain_type_error(" ".join(message.split())))
    return None


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
    try:
        hugepages.restart_with_hugepages()
    except UserError as e:  # VIT_JAX_HUGEPAGES
        _fail(str(e))

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
