"""The CUDA driver calls that queue a batched step, made without letting go of Python's lock.

A server runs two Python threads that share one interpreter lock: the scheduler, which
queues the GPU's steps, and the event loop, which writes the streams. CuPy lets go of the
lock in every CUDA call, and a thread that lets go of it gets it back only when the holder
blocks or reaches its switch interval (server/app.py SWITCH_INTERVAL). Queueing a step is
four calls (the inputs in, the graph, the chosen ids out, an event), each a few microseconds
that never block; through CuPy each was a chance to wait up to a switch interval while the
GPU ran dry. Here they are called through `ctypes.PyDLL`, which keeps the lock: the step is
queued in one stretch, and the scheduler lets go of the lock once, where it waits for the
GPU (CuPy's event synchronize).

The driver API takes the handles CuPy's runtime calls make (streams, events, graph
executables and device pointers are the same objects), in the CUDA context the runtime made
current on this thread. Where the library cannot be loaded, or a thread has no current
context yet, `driver()` gives None and the caller goes through CuPy.
"""
from __future__ import annotations

import ctypes
import threading

_local = threading.local()
_lib = None


class Driver:
    """libcuda's asynchronous copies, graph launch, event record and synchronize (see module docstring)."""

    def __init__(self, lib):
        self.lib = lib
        for name in ("cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2", "cuGraphLaunch", "cuEventRecord",
                     "cuEventSynchronize"):
            getattr(lib, name).restype = ctypes.c_int

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: CUDA driver error {status}")

    def to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                                   ctypes.c_void_p(stream)), "cuMemcpyHtoDAsync")

    def to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cuMemcpyDtoHAsync_v2(ctypes.c_void_p(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes),
                                                   ctypes.c_void_p(stream)), "cuMemcpyDtoHAsync")

    def launch(self, graph_exec: int, stream: int) -> None:
        self._check(self.lib.cuGraphLaunch(ctypes.c_void_p(graph_exec), ctypes.c_void_p(stream)), "cuGraphLaunch")

    def record(self, event: int, stream: int) -> None:
        self._check(self.lib.cuEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cuEventRecord")

    def synchronize(self, event: int) -> None:
        """Wait for an event with the lock held: only for one that has (almost surely) passed."""
        self._check(self.lib.cuEventSynchronize(ctypes.c_void_p(event)), "cuEventSynchronize")


def driver() -> Driver | None:
    """This thread's Driver, or None where libcuda cannot be loaded or the thread has no
    current CUDA context (the caller then goes through CuPy)."""
    global _lib
    held = getattr(_local, "driver", False)
    if held is not False:
        return held
    if _lib is None:
        try:
            _lib = ctypes.PyDLL("libcuda.so.1")
        except OSError:
            _lib = ()
    found = None
    if _lib:
        context = ctypes.c_void_p()
        if _lib.cuCtxGetCurrent(ctypes.byref(context)) == 0 and context.value:
            found = Driver(_lib)
    if found is not None:  # a thread without a context yet may have one later
        _local.driver = found
    return found
