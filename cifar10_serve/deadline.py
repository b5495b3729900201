"""The worker thread's CPU time: the clock work is counted on, and a deadline on it for a block of
Python code. The start-up calibration (runtimes.py) and the batch budget (budget.py) count on
``work_clock``; decoding a request's images (images.py) is bounded by ``deadline``: Pillow parses
file structure in Python at a cost that grows with the bytes, not the pixels, and the deadline
interrupts it between bytecodes.
"""
import contextlib
import ctypes
import ctypes.util
import signal
import sys
import threading
import time


def work_clock(device_type="cpu"):
    """The clock work is counted on: on a CPU the calling thread's CPU time (the clock the
    decoding deadline counts), on a GPU wall time (its kernels run while the CPU waits).

    Why the thread's and not the process's: a batch's budget is a share of responseTimeout, wall
    time, and on its cores a batch takes about the time its thread runs. Decoding runs on the
    handler's thread alone; a forward or Integrated Gradients with `threads: N` splits each
    operator over N threads, the handler's one of them, so its thread runs about as long as the
    batch takes while the process's CPU time counts all N (and the pool's idle spinning): about
    N x over (the CIFAR net's Integrated Gradients with threads: 2, medians of 12 start-up
    timings on a 2-core Intel Xeon: 522 ms of process CPU time, 249 ms of the thread's, 307 ms
    wall). Time spent waiting for a core, on a machine busy with other work, is on neither:
    a worker started beside a busy one does not over-charge its work for its whole life, nor
    does a slow moment push a batch's requests out; it stretches the batch's wall time, which
    responseTimeout's headroom is for."""
    return time.perf_counter if device_type == "cuda" else time.thread_time


class Expired(BaseException):
    """Raised inside the block when its time is up: a BaseException, so no `except Exception` in
    a decoder plugin swallows it; deadline() turns it into TimeoutError."""


def _timer_library():
    """The C library that has timer_create (glibc >= 2.34 and musl: libc itself; older glibc:
    librt), or None off Linux."""
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
    """Send SIGPROF once the calling thread has used ``first`` seconds of CPU time, then every
    ``every`` seconds; return the function that disarms it.

    On Linux the timer counts this thread's CPU alone and signals this thread alone
    (timer_create on CLOCK_THREAD_CPUTIME_ID with SIGEV_THREAD_ID). A process-wide ITIMER_PROF,
    the fallback elsewhere, counts torch's and ONNX Runtime's spinning pool threads too, and the
    kernel sends its SIGPROF to whichever thread used the last tick: CPython before 3.13 then only
    notes the signal, and the main thread does not run the handler until something else wakes its
    eval loop (CI once saw a 1-s burn run through a 10-ms deadline that way).
    """
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
    """Raise TimeoutError from the block once its thread has used ``milliseconds`` of CPU time.

    Pillow parses file structure (JPEG markers, PNG chunks, TIFF strips, GIF sub-blocks, BMP runs)
    in Python, at a cost that grows with the body's bytes rather than its pixels: 8 MiB of
    one-row TIFF strips took 21 s. A CPU-time timer (so a busy machine does not shorten the
    allowance; see arm_cpu_timer) interrupts that Python code between bytecodes with an exception
    no `except Exception` inside a plugin can swallow (Expired). It works in the main thread
    only, where TorchServe's worker runs the handler; elsewhere the block runs unbounded.
    """
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
