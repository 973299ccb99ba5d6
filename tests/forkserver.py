"""Fresh processes without the seconds of importing torch: a server process loads the
libraries the project imports once, then forks a child per request, and the child runs
as a process of its own: the installed console script (its own pid, signals, exit
status, stdout and stderr), Python code as ``python -c`` runs it, or the import of one
project module with none loaded.

Run as a script, this file is the server: ``python forkserver.py SCRIPT_DIR LIB...``
reads one JSON request a line on stdin and answers one JSON value a line. Imported (by
conftest), it is the client: ``ForkServer``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Result:
    """What a command run left: as subprocess.CompletedProcess names it."""

    returncode: int
    stdout: str
    stderr: str


# --- the server ----------------------------------------------------------------------


def _serve() -> dict[str, Any]:
    """Answer requests until stdin closes; returns (in a forked child) the child's request.

    ``start``/``import``/``code``: fork a child, answer its pid. ``poll``: its exit status or
    null while it runs. ``wait``: its exit status (null: killed at the timeout)."""
    ended: dict[int, int] = {}
    started: list[int] = []

    def reap(pid: int, block: bool) -> int | None:
        if pid not in ended:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            if not done:
                return None
            ended[pid] = os.waitstatus_to_exitcode(status)
        return ended[pid]

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "poll":
            reply = reap(req["pid"], block=False)
        elif req["op"] == "wait":
            deadline = time.monotonic() + req["timeout"]
            while (reply := reap(req["pid"], block=False)) is None:
                if time.monotonic() > deadline:
                    os.kill(req["pid"], signal.SIGKILL)
                    reap(req["pid"], block=True)
                    break
                time.sleep(0.005)
        else:
            pid = os.fork()
            if pid == 0:
                return req
            started.append(pid)
            reply = pid
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for pid in started:  # the client has gone: what it left running ends with it
        if reap(pid, block=False) is None:
            os.kill(pid, signal.SIGKILL)
            reap(pid, block=True)
    os._exit(0)


def _become(req: dict[str, Any]) -> None:
    """In the child: the request's stdin, stdout, stderr, directory and environment."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])


def _child(req: dict[str, Any]) -> None:
    _become(req)
    if req["op"] == "import":
        try:
            importlib.import_module(req["module"])
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    if req["op"] == "code":  # as ``python -c CODE`` runs it
        sys.argv = ["-c"]
        exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
        return
    # The console script, as its own process runs it: it ends in sys.exit(main()), and
    # this process exits as any Python process does (atexit, threads, buffers).
    sys.argv = [req["script"], *req["args"]]
    runpy.run_path(req["script"], run_name="__main__")


# --- the client ----------------------------------------------------------------------


class ForkServer:
    """The server, started with ``libraries`` loaded and ``env`` (fixed at its start:
    OMP_NUM_THREADS is read when torch is imported)."""

    def __init__(self, script: str, libraries: list[str], env: dict[str, str]) -> None:
        self.script = script
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(Path(script).parent), *libraries],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **request: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended ({self.proc.wait()})")
        return json.loads(line)

    def start(self, args: list[str], cwd: Path, env: dict[str, str]) -> Forked:
        """The console script with ``args`` from ``cwd``, in a fresh process."""
        return Forked(self, "start", cwd, env, script=self.script, args=args)

    def run_code(self, code: str, cwd: Path, env: dict[str, str]) -> Result:
        """Python ``code`` in a fresh process, as ``python -c`` runs it."""
        return Forked(self, "code", cwd, env, code=code).result()

    def imports_alone(self, modules: list[str]) -> dict[str, str]:
        """Each module imported first in a fresh process, as many at once as there are
        cores: the ones that fail, and why."""
        cores = len(os.sched_getaffinity(0))
        failed: dict[str, str] = {}
        running: list[Forked] = []

        def finish(child: Forked) -> None:
            done = child.result()
            if done.returncode != 0:
                failed[child.args[0]] = done.stderr[-2000:]

        for name in modules:
            if len(running) == cores:
                finish(running.pop(0))
            running.append(Forked(self, "import", Path.cwd(), dict(os.environ), module=name))
        for child in running:
            finish(child)
        return failed

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Forked:
    """A child of the server, as subprocess.Popen names it: ``pid``, ``poll()``,
    ``send_signal()``; ``result()`` waits for it and reads what it wrote."""

    def __init__(self, server: ForkServer, op: str, cwd: Path, env: dict, **request: Any):
        self.server = server
        self.files = []
        for _ in range(2):
            fd, path = tempfile.mkstemp(prefix="forked-")
            os.close(fd)
            self.files.append(Path(path))
        paths = {"stdout": str(self.files[0]), "stderr": str(self.files[1])}
        self.pid = server.ask(op=op, cwd=str(cwd), env=env, **paths, **request)
        self.args = request.get("args", [request.get("module")])
        self.done: Result | None = None

    def poll(self) -> int | None:
        return self.server.ask(op="poll", pid=self.pid)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def result(self, check: bool = False, timeout: int = 600) -> Result:
        if self.done is None:
            code = self.server.ask(op="wait", pid=self.pid, timeout=timeout)
            texts = []
            for path in self.files:
                texts.append(path.read_text())
                path.unlink()
            self.done = Result(-9 if code is None else code, *texts)
        done = self.done
        if check and done.returncode != 0:
            raise AssertionError(
                f"resnet-exp {' '.join(self.args)} failed ({done.returncode}):\n"
                f"{done.stderr[-3000:]}"
            )
        return done


if __name__ == "__main__":
    sys.path[0] = sys.argv[1]  # as the console script's own directory is
    for library in sys.argv[2:]:
        importlib.import_module(library)
    # fork copies only the calling thread: a library's thread would be missing in a child
    assert threading.active_count() == 1, threading.enumerate()
    # The loaded libraries' objects out of the collector's sight: a child's collections,
    # and its exit, would otherwise touch (and copy) every page of them (1.5 s a child).
    gc.freeze()
    _child(_serve())
