"""client.py against a stub HTTP server started here (a free loopback port, stopped by the test):
it resends a 429/503 after the answer's Retry-After, and after its own short delays without one.
"""
import datetime
import email.utils
import json
import time

import pytest
import requests

import client as client_module
from client import TorchServeClient, retry_after
from tests.harness import Stub


@pytest.fixture
def client_of(tmp_path):
    """client_of(stub) -> a TorchServeClient whose inference address is the stub's."""
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k"}}))

    def make(stub):
        config = tmp_path / "config.properties"
        config.write_text(f"inference_address=http://127.0.0.1:{stub.server_address[1]}\n")
        return TorchServeClient(config, tmp_path / "key_file.json")
    return make


@pytest.fixture
def sleeps(monkeypatch):
    """The delays client.py sleeps (it still sleeps them)."""
    asked, real = [], time.sleep
    monkeypatch.setattr(client_module.time, "sleep", lambda s: (asked.append(s), real(s)))
    return asked


@pytest.mark.parametrize("status", [503, 429])
def test_a_retry_after_in_seconds_is_waited_before_the_resend(client_of, sleeps, status):
    with Stub([(status, {"Retry-After": "2"})]) as stub:
        response = client_of(stub).predict(b"image")
    assert response.status_code == 200 and len(stub.arrived) == 2
    assert stub.arrived[1] - stub.arrived[0] >= 2.0
    assert sleeps == [2.0]


def test_a_retry_after_as_an_http_date_is_waited_until_then(client_of, sleeps):
    # HTTP-dates have whole seconds: 3 s ahead is at least 2 s ahead once formatted.
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    with Stub([(503, {"Retry-After": when})]) as stub:
        assert client_of(stub).predict(b"image").status_code == 200
    assert len(stub.arrived) == 2 and stub.arrived[1] - stub.arrived[0] >= 2.0
    assert 2.0 <= sleeps[0] <= 3.0


def test_without_retry_after_the_resends_come_after_the_clients_own_delays(client_of, sleeps):
    with Stub([(503, {}), (507, {})]) as stub:
        assert client_of(stub).predict(b"image").status_code == 200
    assert len(stub.arrived) == 3 and sleeps == list(client_module.RETRY_DELAYS)


def test_a_retry_after_over_the_bound_is_answered_without_waiting(client_of, sleeps):
    with Stub([(503, {"Retry-After": "3600"})]) as stub:
        response = client_of(stub).predict(b"image")
    assert response.status_code == 503 and len(stub.arrived) == 1 and sleeps == []


def test_a_success_or_a_client_error_is_not_resent_whatever_its_headers(client_of, sleeps):
    with Stub([(400, {"Retry-After": "1"})]) as stub:
        assert client_of(stub).predict(b"image").status_code == 400
    assert len(stub.arrived) == 1 and sleeps == []


@pytest.mark.parametrize("value,seconds", [
    ("2", 2.0), (" 120 ", 120.0), ("0", 0.0), ("Thu, 01 Jan 2026 00:00:05 GMT", 5.0),
    ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0), ("soon", None), ("-1", None), ("1.5", None),
    ("\u00b2", None),
    ("", None)])
def test_retry_after_reads_seconds_and_http_dates(value, seconds):
    response = requests.Response()
    if value:
        response.headers["Retry-After"] = value
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    assert retry_after(response, now=now) == seconds
