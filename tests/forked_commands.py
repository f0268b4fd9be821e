"""Run Python commands as forks of one process that has already imported their modules.

tests/test_bad_input.py runs about a hundred commands that each stop at their first check; alone,
each spends ~2 s of its ~2.3 s importing torch and the recipes. This server imports those modules
once, then forks a child per command: the child is its own process (own exit status, own stdout
and stderr files, own working directory, ``sys.argv`` as the command gave it) and runs the module,
script or console script the way the interpreter would (``-m`` as ``__main__`` with the working
directory first on ``sys.path``; a script with its folder first). What a fork cannot reproduce is
an environment read at start-up (glibc's ``MALLOC_*``) or at import (``TRITON_INTERPRET``,
``DYT_BACKEND``): commands with an environment of their own run in a fresh interpreter instead.

Protocol, one JSON object a line: the client writes ``{"argv", "cwd", "stdout", "stderr",
"timeout"}``; the server answers ``{"returncode", "timed_out"}`` once the child has ended
(negative: killed by that signal, as ``subprocess`` reports it; a child still running after
``timeout`` seconds is killed).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time


def _run_child(request: dict) -> int:
    """In the forked child: become the command, return its exit status."""
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    argv = request["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            sys.modules.pop(argv[1], None)  # imported by the server; -m runs a first import as __main__
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the interpreter prints any uncaught exception
        sys.excepthook(*sys.exc_info())
        return 1


def _child(request: dict, channel_fds: tuple[int, ...]) -> None:
    """Run the command and end the process as the interpreter would: non-daemon threads joined,
    ``atexit`` handlers run, streams flushed; never back into the server's loop."""
    code = 1
    try:
        for fd in channel_fds:
            os.close(fd)
        code = _run_child(request)
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code & 0xFF)


def _wait(pid: int, timeout: float) -> dict:
    """The child's exit status as ``subprocess`` gives it (negative: killed by that signal), and
    whether it was killed for running past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return {"returncode": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "timed_out": True}
        time.sleep(0.01)


def serve(modules: list[str]) -> None:
    # The requests and replies keep fds of their own; the server's (and so every child's) stdin and
    # stdout point nowhere before anything is imported: output at import reaches no reply or case.
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child imports it again and fails as a fresh process would
            pass
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, (requests.fileno(), replies.fileno()))
        replies.write(json.dumps(_wait(pid, request["timeout"])) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.argv[1:])
