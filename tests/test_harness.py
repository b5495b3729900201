"""The harness's good-traffic generator (tests/harness.py) against a stand-in server: what it
sends, what it counts, and that it tells a wrong answer from a right one."""
import pytest

from tests.harness import GoodTraffic, Stub

BODIES = [b"cat image", b"dog image", b"cat again"]


def by_first_word(body):
    """A stand-in model: the class is the body's first word (of the first image of a form)."""
    image = body.split(b"\r\n\r\n", 1)[1] if body.startswith(b"--") else body
    return {image.split()[0].decode(): 1.0}


def test_each_answer_is_checked_against_the_servers_own_answer_for_that_body():
    with Stub(answer=by_first_word) as stub:
        right = GoodTraffic(stub.url, {"Authorization": "Bearer k"}, BODIES, clients=2,
                            check=True)
        assert right.expected == [{"cat": 1.0}, {"dog": 1.0}, {"cat": 1.0}]
        with right:
            right.wait_for(30)
        wrong = GoodTraffic(stub.url, {}, BODIES, clients=2, check=True)
        stub.answer = lambda body: {"ship": 1.0}  # the server now answers otherwise
        with wrong:
            wrong.wait_for(10)
    assert right.summary()["outcomes"] == {200: right.summary()["requests"]}
    assert wrong.summary()["outcomes"] == {"wrong answer": wrong.summary()["requests"]}
    assert set(stub.bodies) == set(BODIES)


def test_a_failed_request_is_counted_once_and_never_resent():
    with Stub([(503, {"Retry-After": "1"}), (500, {})]) as stub:
        load = GoodTraffic(stub.url, {}, BODIES, clients=1, seconds=0.3).start().join()
    summary = load.summary()
    assert [s.outcome for s in load.results()[:3]] == [503, 500, 200]
    assert summary["failed"] == 2 and summary["ok"] == summary["requests"] - 2
    assert summary["p50_s"] <= summary["p99_s"] <= summary["max_s"]
    assert len(stub.bodies) == summary["requests"]


def test_several_images_per_request_go_as_multipart_fields_in_turn():
    with Stub() as stub:
        load = GoodTraffic(stub.url, {}, BODIES, clients=1, per_request=2, seconds=0.3)
        summary = load.start().join().summary()
    first = stub.bodies[0]
    assert first.count(b'name="image') == 2 and b"cat image" in first and b"dog image" in first
    assert b"cat again" in stub.bodies[1] and b"cat image" in stub.bodies[1]
    assert summary["images_per_s"] == pytest.approx(
        2 * summary["ok"] / (load.ended - load.started))
