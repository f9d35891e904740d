"""``splice._memory.one_arena``: threads started after it allocate from glibc's main arena
instead of one arena each (counted from ``malloc_info``, in a fresh process)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ctypes, os, sys, tempfile, threading
from splice._memory import one_arena
if sys.argv[1] == "one":
    assert one_arena()
barrier, held = threading.Barrier(5), []
def work():
    held.append([bytearray(4096) for _ in range(20)])  # glibc malloc, in this thread
    barrier.wait()  # all four alive at once
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
barrier.wait()
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
for t in threads:
    t.join()
print(open(path).read().count("<heap nr="))
os.remove(path)
"""


def test_threads_after_one_arena_share_the_main_arena():
    def heaps(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert heaps("one") == 1
    assert heaps("default") > 1  # each thread its own arena otherwise
