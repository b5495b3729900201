"""bench/bench.py's CPU accounting: where a served request's CPU time goes (frontend, workers,
wrk), read from /proc, as its tables print it."""
import os
import time

import pytest

from bench import bench

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@needs_proc
def test_cpu_seconds_counts_the_cpu_time_a_process_used():
    me = {"workers": [os.getpid()]}
    before = bench.cpu_seconds(me)["workers"]
    burn(0.3)
    used = bench.cpu_seconds(me)["workers"] - before
    assert 0.25 <= used <= 0.6, used


@needs_proc
def test_a_process_that_is_gone_leaves_its_role_out():
    gone = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10_000_000
    assert bench.cpu_seconds({"frontend": [os.getpid()], "workers": [gone]}).keys() == {"frontend"}


@needs_proc
def test_with_cpu_divides_each_roles_time_by_the_answered_requests():
    def run():
        burn(0.2)
        return {"requests": 100, "wrk_cpu_s": 0.05}
    result = bench.with_cpu({"workers": [os.getpid()]}, run)
    cpu = result["cpu_ms_per_request"]
    assert cpu["wrk"] == pytest.approx(0.5)
    assert 1.5 <= cpu["workers"] <= 4.0, cpu  # 0.2 s over 100 requests: ~2 ms each
    assert bench.cpu_cell(result) == f"- / {cpu['workers']:.2f} / 0.50"
