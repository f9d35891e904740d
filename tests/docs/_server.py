"""Runs documented examples, each in a process of its own, without paying ``import torch``
each time: this process imports torch, transformers, the CLI and the fixtures once, computes
nothing, and forks a child per example (one JSON request per stdin line, one reply per line).

- ``{"cli": [args], "cwd": dir, "log": file}``: the ``splice`` console script's own entry
  point (``splice.cli:main``) with ``sys.argv = ["splice", *args]``;
- ``{"python": code, "name": id, "fixture": name|null, "cwd": dir, "log": file}``: the code
  executed in a fresh namespace holding the fixture's objects.

The child's stdout/stderr go to ``log``; the reply is ``{"rc": exit status}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

sys.path.insert(0, sys.argv[1])  # the repository root: `tests.*` imports
# One thread per example: on a loaded 2-core box, intra-op thread barriers made the training
# examples 15x slower (measured: 140 s instead of 6 s for one block).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: F401  (preloaded for the children)
import transformers  # noqa: F401

from splice.cli import main
from tests.docs._fixtures import NAMESPACES


def child(request: dict) -> int:
    os.chdir(request["cwd"])
    if "cli" in request:
        sys.argv = ["splice", *request["cli"]]
        try:
            return main() or 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    fixture = request.get("fixture")
    namespace = {"__name__": "__main__", **(NAMESPACES[fixture]() if fixture else {})}
    exec(compile(request["python"], request["name"], "exec"), namespace)
    return 0


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            signal.alarm(request.get("timeout", 300))  # a hung example dies, it does not hang CI
            rc = 1
            try:
                rc = child(request)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    print(json.dumps({"ready": True}), flush=True)
    serve()
