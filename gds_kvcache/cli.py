"""``gds-kvcache`` command: ``demo`` (default), ``info``, ``bench``, ``bench-kernels``, ``bench-alloc``, ``bench-ttft``.

Every failure a user can fix is reported as one line on stderr,
``gds-kvcache <command>: error: ...``, never as a traceback:

* exit 2: the command line or the environment is wrong (an unknown command,
  a bad flag or value, a missing ``--dir``, a bad ``GDS_KVCACHE_*`` value);
  checked before any work starts;
* exit 1: the command ran and failed (a library error such as a bad config
  file or a locked cache directory, an OS error, out of memory).

The argument types here (``int_range``, ``existing_dir``, ``creatable_dir``,
``writable_file``) and ``ArgumentParser`` are shared by the subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import sys
from typing import Callable, NoReturn, Optional

from .errors import ConfigError, GdsKvCacheError

__all__ = ["ArgumentParser", "COMMANDS", "creatable_dir", "existing_dir", "int_range", "main", "writable_file"]

COMMANDS = {
    "demo": "gds_kvcache.demo",
    "info": "gds_kvcache.bench.info",
    "bench": "gds_kvcache.bench.storage",
    "bench-kernels": "gds_kvcache.bench.kernels",
    "bench-alloc": "gds_kvcache.bench.alloc",
    "bench-ttft": "gds_kvcache.bench.ttft",
}
PROG = "gds-kvcache"
_HELP = ("-h", "--help")


# -- argument parsing ------------------------------------------------------------------
def _error_in_one_line(self: argparse.ArgumentParser, message: str) -> NoReturn:
    # argparse prints the whole usage (often several lines) before the error;
    # the error alone, with a pointer to --help, reads better in a log.
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr (exit 2)."""

    error = _error_in_one_line


@contextlib.contextmanager
def _one_line_usage_errors():
    # Some subcommands (info, bench-ttft) build plain argparse parsers in
    # modules other people own; while a command runs, every parser reports
    # usage errors the same one-line way.
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _error_in_one_line
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def int_range(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type``: a decimal integer in ``lo..hi`` (no upper bound when ``hi`` is None)."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return v

    return parse


def _writable_dir_problem(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isdir(path):
        return "is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def existing_dir(text: str) -> str:
    """An argparse ``type``: an existing, writable directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a directory")
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist (create it first)")
    problem = _writable_dir_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def creatable_dir(text: str) -> str:
    """An argparse ``type``: a writable directory, or a path where one can be created."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a directory")
    path = os.path.abspath(text)
    if os.path.exists(path):
        problem = _writable_dir_problem(path)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r} {problem}")
        return text
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    problem = _writable_dir_problem(parent)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {parent!r} {problem}")
    return text


def writable_file(text: str) -> str:
    """An argparse ``type``: a file path whose directory exists and is writable."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(text))
    problem = _writable_dir_problem(parent)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {parent!r} {problem}")
    return text


# -- dispatch ---------------------------------------------------------------------------
def _usage() -> str:
    return (f"usage: {PROG} [{'|'.join(COMMANDS)}] [options]\n"
            "With no command, runs the demo (the main job). Each command takes --help.\n"
            "Exit status: 0 ok, 1 the command failed, 2 bad command line or GDS_KVCACHE_* environment.")


def _fail(prog: str, message: str, code: int) -> int:
    # One line whatever the message holds: log scrapers and CI annotations read line by line.
    text = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return code


def _os_message(e: OSError) -> str:
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename!r}"
    return e.strerror or str(e) or type(e).__name__


def _is_out_of_memory(e: BaseException) -> bool:
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e))


def _environment_error() -> Optional[str]:
    """What is wrong with the ``GDS_KVCACHE_*``/``LMCACHE_*`` configuration variables, or None."""
    from .config import CacheEngineConfig

    try:
        CacheEngineConfig.from_env()
    except ConfigError as e:
        return str(e)
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in _HELP + ("help",):
        print(_usage())
        return 0
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        # Running the demo on a mistyped command would start minutes of I/O.
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return _fail(PROG, f"unknown command {argv[0]!r} (valid commands: {', '.join(COMMANDS)}){hint}", 2)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "demo"
    prog = f"{PROG} {cmd}"
    if not any(a in _HELP for a in argv):
        # Checked for every command, even those that build no config: a typo in
        # a variable the user meant to apply must not pass silently.
        problem = _environment_error()
        if problem:
            return _fail(prog, f"environment: {problem}", 2)
    try:
        module = importlib.import_module(COMMANDS[cmd])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[cmd]:
            return _fail(prog, f"this command is not available in this installation ({e.name} is missing)", 1)
        return _fail(prog, f"this command needs the Python module {e.name!r}, which is not installed", 1)
    try:
        with _one_line_usage_errors():
            return module.main(argv)
    except GdsKvCacheError as e:
        return _fail(prog, str(e), 1)
    except OSError as e:
        return _fail(prog, _os_message(e), 1)
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        return _fail(prog, f"out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "try smaller sizes", 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
