"""The worker thread's CPU time: the clock calibration (runtimes.py) and the batch budget count
work on, and a deadline on it that bounds decoding: Pillow parses file structure in Python at a
cost that grows with the bytes, not the pixels, and the deadline interrupts it between bytecodes.
"""
import contextlib
import ctypes
import ctypes.util
import signal
import sys
import threading
import time


def work_clock(device_type="cpu"):
    """On a CPU the calling thread's CPU time, on a GPU wall time (kernels run while the CPU waits).

    Not the process's: with `threads: N` an operator splits over N threads, the handler's one of
    them, so its thread runs about as long as the batch takes while the process counts N x (IG with
    threads: 2 on a 2-core Xeon: 522 ms process, 249 ms thread, 307 ms wall). Waiting for a core is
    on neither, so a worker started beside a busy one does not over-charge its work for its life."""
    return time.perf_counter if device_type == "cuda" else time.thread_time


class Expired(BaseException):
    """A BaseException, so no `except Exception` in a decoder plugin swallows it."""


def _timer_library():
    """timer_create's library: libc (glibc >= 2.34, musl), else librt; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    for name in (None, ctypes.util.find_library("rt")):
        library = ctypes.CDLL(name, use_errno=True)
        if hasattr(library, "timer_create"):
            return library
    return None


_LIBRT = _timer_library()
SIGEV_THREAD_ID, CLOCK_THREAD_CPUTIME_ID = 4, 3  # Linux <bits/sigevent-consts.h>, <time.h>


def arm_cpu_timer(first, every):
    """SIGPROF once this thread has used ``first`` s of CPU, then every ``every`` s; returns disarm.

    On Linux the timer counts and signals this thread alone (CLOCK_THREAD_CPUTIME_ID,
    SIGEV_THREAD_ID). ITIMER_PROF, the fallback, counts torch's spinning pool threads too and
    signals whichever thread used the last tick, where CPython < 3.13 runs no handler until the
    main thread's eval loop wakes (a 1-s burn once ran through a 10-ms deadline)."""
    if _LIBRT is None:
        signal.setitimer(signal.ITIMER_PROF, first, every)
        return lambda: signal.setitimer(signal.ITIMER_PROF, 0)
    event = (ctypes.c_int * 16)()  # struct sigevent, 64 bytes: sigval (8), signo, notify, tid
    event[2], event[3], event[4] = signal.SIGPROF, SIGEV_THREAD_ID, threading.get_native_id()
    timer = ctypes.c_void_p()
    if _LIBRT.timer_create(CLOCK_THREAD_CPUTIME_ID, event, ctypes.byref(timer)):
        raise OSError(ctypes.get_errno(), "timer_create failed")
    nanoseconds = [divmod(round(seconds * 1e9), 10**9) for seconds in (every, first)]
    spec = (ctypes.c_long * 4)(*nanoseconds[0], *nanoseconds[1])  # struct itimerspec
    if _LIBRT.timer_settime(timer, 0, spec, None):
        _LIBRT.timer_delete(timer)
        raise OSError(ctypes.get_errno(), "timer_settime failed")
    return lambda: _LIBRT.timer_delete(timer)


@contextlib.contextmanager
def deadline(milliseconds):
    """TimeoutError from the block once its thread has used ``milliseconds`` of CPU time (8 MiB of
    one-row TIFF strips took 21 s to parse). Main thread only, where TorchServe's worker runs the
    handler; elsewhere the block runs unbounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    armed = [True]
    # Frames where raising would escape the handling below: this generator's own except/finally,
    # contextlib's __exit__ that throws the exception into it, and arm_cpu_timer (before it
    # returns, nothing could disarm the timer it armed).
    own = {sys._getframe().f_code, contextlib._GeneratorContextManager.__exit__.__code__,
           arm_cpu_timer.__code__}

    def expire(signum, frame):
        # Raised inside a weakref callback or a __del__ (the garbage collector runs them
        # anywhere), the exception is swallowed: so the timer fires again every 10 ms until
        # the block has ended.
        if armed[0] and (frame is None or frame.f_code not in own):
            raise Expired

    def unraisable(report):
        # An Expired swallowed that way is expected: no "Exception ignored" traceback for it.
        # The hook before (a Python one under pytest) gets everything else.
        if not isinstance(report.exc_value, Expired):
            previous_hook(report)
    own.add(unraisable.__code__)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = signal.signal(signal.SIGPROF, expire)
    disarm = None
    try:
        disarm = arm_cpu_timer(milliseconds / 1000, 0.01)
        yield
    except Expired:
        raise TimeoutError(f"ran past {milliseconds} ms") from None
    finally:
        armed[0] = False
        if disarm:
            disarm()
        signal.signal(signal.SIGPROF, previous)
        sys.unraisablehook = previous_hook
