"""The allocator policies calibration uses (``splice._memory``), each in a fresh process:
``one_arena`` — threads started after it allocate from glibc's main arena instead of one arena
each (counted from ``malloc_info``); ``heap_reuse`` — a loop of same-size buffers faults its
pages in once instead of on every allocation, and the pinned mmap threshold is back after."""

from __future__ import annotations

import subprocess
import sys

ARENAS = """
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
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert heaps("one") == 1
    assert heaps("default") > 1  # each thread its own arena otherwise


REUSE = """
import ctypes, resource
from splice._memory import heap_reuse, return_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
assert return_freed_memory()
def faults(n=20, size=4 << 20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(ctypes.c_void_p(p))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
with heap_reuse():
    inside = faults()
print(before, inside, faults())
"""


def test_heap_reuse_faults_a_reused_buffer_in_once_and_restores_the_threshold():
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, inside, after = map(int, out.stdout.split())
    pages = 20 * (4 << 20) // 4096  # 20 fresh 4 MB mappings, touched
    assert before >= pages // 2 and after >= pages // 2  # mmapped (the 1 MB threshold)
    assert inside <= before // 5  # one buffer from the heap, faulted in once, reused
