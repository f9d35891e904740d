"""Run corpus cases through the real CLI entry point, in one process, and report as JSON.

Usage: ``python tests/corpus/run_cases.py MANIFEST.json`` (a list of {id, args, expect}).
Each case runs ``splice.cli.main`` with its arguments under a 10 s alarm; the report gives the
exit code, what was printed on stderr, the time taken, and the process's peak RSS at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import sys
import time
import traceback


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang


def run(cases: list[dict]) -> dict:
    from splice.cli import main

    signal.signal(signal.SIGALRM, _alarm)
    results = []
    for case in cases:
        err, out = io.StringIO(), io.StringIO()
        code: object = 0
        t0 = time.perf_counter()
        sys.argv = ["splice", *case["args"]]
        signal.alarm(10)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                main()
        except SystemExit as e:
            code = e.code
        except _Hang:
            code = "hang"
        except BaseException:
            code = "crash"
            err.write(traceback.format_exc())
        finally:
            signal.alarm(0)
        results.append(
            {
                "id": case["id"],
                "code": code,
                "stderr": err.getvalue(),
                "seconds": time.perf_counter() - t0,
            }
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"results": results, "peak_rss_mib": peak}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        manifest = json.load(f)
    json.dump(run(manifest), sys.stdout)
