"""One error boundary for every command (see docs/errors.md).

A problem the user can fix (a config key, a file, a command-line option, a full disk) is a
:class:`UserInputError`; the config, data, audio, FASTA and tokenizer errors of the harness and the
recipes subclass it. Every command runs under :func:`user_errors`, which prints such an error as one
line, ``<program>: <kind>: <message>``, and exits with status 2. ``DYT_DEBUG=1`` also prints the
traceback. Any other exception is a bug and keeps its traceback (exit status 1).

Under a launcher (``RANK`` set), an error every rank hits in the same way (everything found while
setting up: config, data) is printed by rank 0 only; the other ranks exit 2 without a word. An
error found on one rank only (``every_rank = False``, e.g. a damaged file met while training)
is printed by the rank that hit it.

Standard library only: ``dyt-bench`` uses this without the ``train`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

EXIT_USER_ERROR = 2
DEBUG_ENV = "DYT_DEBUG"
QUIET_RANK_GRACE_S = 2.0
"""A rank other than 0 waits this long before its quiet exit, so that the launcher (which stops every
rank once one has exited with an error) does not stop rank 0 before it has printed the message."""


class UserInputError(ValueError):
    """Bad input or a fixable environment problem; the message names the file, key or option, what
    is wrong and, where it is not obvious, what to do."""

    kind = "error"
    """Printed after the program's name: ``config error``, ``data error``, ``audio error``, ..."""
    every_rank = True
    """True: every rank of a launch hits this error alike, and rank 0 alone reports it."""
    raised_together = False
    """True: every rank raises it at the same point, once a collective agreed on it (a failed save, a
    divergence), so no rank is left in a collective and a launch may tear its process group down."""


E = TypeVar("E", bound=BaseException)


def raised_together(error: E) -> E:
    """``error``, marked as raised by every rank at the same point after a collective agreed on it
    (:attr:`UserInputError.raised_together`; for another error, its traceback's rank stopping with
    the others): a recipe's main then ends without the interpreter's teardown."""
    error.raised_together = True  # type: ignore[attr-defined]
    return error


def debug() -> bool:
    """``DYT_DEBUG`` is set to something other than empty, 0, false or no."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(prog: str, error: UserInputError) -> str:
    """``<prog>: [rank N: ]<kind>: <message>`` on one line."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    rank = os.environ.get("RANK")
    where = f"rank {rank}: " if rank is not None and not error.every_rank and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    return f"{prog}: {where}{error.kind}: {message}"


def report(prog: str, error: UserInputError) -> None:
    """Print ``error`` as :func:`user_errors` does (or not, on a quiet rank) and exit with status 2."""
    quiet = error.every_rank and os.environ.get("RANK", "0") not in ("", "0")
    sys.stdout.flush()
    if debug():
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    elif quiet:
        time.sleep(QUIET_RANK_GRACE_S)
        raise SystemExit(EXIT_USER_ERROR)
    print(one_line(prog, error), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


class user_errors(contextlib.ContextDecorator):
    """``with user_errors("prog"):`` or ``@user_errors("prog")``: a :class:`UserInputError` raised
    inside becomes one line on stderr and exit status 2 (see the module docstring)."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def __enter__(self) -> user_errors:
        return self

    def __exit__(self, exc_type, error, tb) -> bool:
        if isinstance(error, UserInputError):
            report(self.prog, error)
        if isinstance(error, subprocess.CalledProcessError) and error.returncode == EXIT_USER_ERROR:
            # A command this one launched (a training run of a comparison) met bad input and has said so.
            command = error.cmd if isinstance(error.cmd, str) else " ".join(map(str, error.cmd))
            report(self.prog, UserInputError(f"a launched command stopped with status 2 (its message is above): "
                                             f"{command[:300]}"))
        return False


def command(prog: str, target: str | Callable[[], object]) -> Callable[[], int]:
    """A console-script entry point: ``target`` (a function, or ``"module:function"`` imported when
    the command runs) under :func:`user_errors`, exit status 0 when it returns. The target's return
    value (e.g. a report path) is for Python callers, not the exit status."""

    def run() -> int:
        with user_errors(prog):
            main = target
            if isinstance(main, str):
                module, _, name = main.partition(":")
                main = getattr(importlib.import_module(module), name)
            main()
        return 0

    run.__doc__ = f"The ``{prog}`` command."
    return run


def help_description(doc: str | None) -> str:
    """A command's ``--help`` description from its module docstring: the first paragraph, and while a
    paragraph ends in a colon, the next one too (the example or list it introduces)."""
    paragraphs = (doc or "").strip().split("\n\n")
    kept = paragraphs[:1]
    for paragraph in paragraphs[1:]:
        if not kept[-1].rstrip().endswith(":"):
            break
        kept.append(paragraph)
    return "\n\n".join(kept)


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a folder to write into (existing or created on demand), or None: a
    file stands at it or in place of one of its parents. Checked before work whose results would
    otherwise be lost when the folder cannot be made at the end."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else f"{candidate} is a file, not a folder"
    return None


def user_path(text: str) -> Path:
    """argparse ``type=`` for a path: ``~`` and ``~user`` expanded, as a shell does before a separate
    word but not in ``--out=~/x``."""
    return Path(text).expanduser()


def output_folder(text: str) -> Path:
    """argparse ``type=`` for a folder a command writes into (:func:`user_path`); not empty (that
    would write into, and with ``--fresh`` empty, the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a folder (e.g. runs/compare)")
    path = user_path(text)
    problem = folder_problem(path)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return path


def output_file(text: str) -> Path:
    """argparse ``type=`` for a file a command writes (:func:`user_path`): not a folder, in a folder
    that exists."""
    path = user_path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {path.parent} does not exist")
    return path


def options_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                  actions: Sequence[argparse.Action]) -> list[str]:
    """The first option string of each of ``actions`` that the command line gives, whatever its value:
    an option given at its default value is still a request that a check must see (comparing values
    with the defaults would let ``--ctc-schedule tri-stage`` pass where no CTC eval runs)."""
    unset = object()  # argparse fills a default only where the namespace has no value yet
    namespace = parser.parse_args(argv, argparse.Namespace(**{action.dest: unset for action in actions}))
    return [action.option_strings[0] for action in actions if getattr(namespace, action.dest) is not unset]


def _seen_before(action: argparse.Action, namespace: argparse.Namespace) -> bool:
    """Whether ``action`` already ran in the parse that fills ``namespace``, noting that it has; the
    namespaces are held weakly, so a parser parses again (:func:`options_given`) afresh."""
    given = action.__dict__.setdefault("_given_in", [])
    if any(ref() is namespace for ref in given):
        return True
    given[:] = [ref for ref in given if ref() is not None] + [weakref.ref(namespace)]
    return False


class CommandParser(argparse.ArgumentParser):
    """The commands' parser: an option that holds one value (or one list) given twice is an error.
    argparse keeps the last and drops the others without a word, so ``--config base.yaml --config
    big.yaml`` ran big.yaml alone where layering was meant. Options that collect (``--set``,
    ``--sweep``: ``action="append"``) are not touched."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in (None, "store", "store_const", "store_true", "store_false"):
            self.register("action", name, _given_once(self._registry_get("action", name)))


def _given_once(store: type[argparse.Action]) -> type[argparse.Action]:
    """``store`` (an argparse action class) refusing a second use in one parse."""

    class GivenOnce(store):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            if _seen_before(self, namespace):
                why = " (the last would be used alone, not merged with the first)" if self.nargs != 0 else ""
                parser.error(f"argument {option_string}: given twice: give it once{why}")
            super().__call__(parser, namespace, values, option_string)

    return GivenOnce


class DistinctValues(argparse.Action):
    """argparse ``action=`` for a list option whose values must differ: a seed, eval or task given
    twice would be run (and averaged) twice. The option itself may come once: argparse keeps the last
    of ``--seeds 0 1 --seeds 2`` and drops the rest without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if _seen_before(self, namespace):
            parser.error(f"argument {option_string}: given twice: list every value after one {option_string}")
        seen = set()
        for value in values:
            if value in seen:
                parser.error(f"argument {option_string}: {value} is listed twice")
            seen.add(value)
        setattr(namespace, self.dest, values)
