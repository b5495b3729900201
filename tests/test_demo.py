"""The browser demo end to end: a real TorchServe (the repo's config.properties on free ports, plus
CORS settings for the demo's origin), demo/serve.py in front of it, and demo/index.html in headless
Chromium (Debian's, driven by playwright). Every process is stopped by its pid, also on failure."""
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests
from conftest import FIXTURES, ROOT
from test_serving import torchserve as served

from cifar10_serve.net import CIFAR10_CLASSES

from tests.harness import free_port

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright "
                               "(pip install playwright==1.65.2)")
expect = sync_api.expect
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser tests need Chromium "
                                "(Debian/Ubuntu: apt-get install chromium)")
# Headless and offline: without these Chromium stalls on a machine without internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # generous: the machine may be busy with benchmarks


@pytest.fixture(scope="module")
def demo_origin():
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def torchserve(tiny_checkpoint, tmp_path_factory, demo_origin):
    """A TorchServe on free loopback ports serving the tiny model, with the CORS settings a page
    on demo_origin would need to call it itself; yields a TorchServeClient."""
    cors = (f"cors_allowed_origin={demo_origin}\n"
            "cors_allowed_methods=GET, POST, OPTIONS\n"
            "cors_allowed_headers=Authorization, Content-Type\n")
    with served(tiny_checkpoint, tmp_path_factory.mktemp("torchserve-demo"), cors) as client:
        yield client


@contextlib.contextmanager
def running_demo(port, config, key_file):
    """demo/serve.py on 127.0.0.1:port until the block ends; yields its process (and .origin)."""
    demo = subprocess.Popen([sys.executable, "-m", "demo.serve", "--port", str(port),
                             "--config", str(config), "--key-file", str(key_file)], cwd=ROOT)
    demo.origin = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{demo.origin}/config.json", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if demo.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"demo/serve.py did not answer on port {port}")
                time.sleep(0.1)
        yield demo
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=10)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


@pytest.fixture(scope="module")
def demo(torchserve, demo_origin):
    """The demo server on demo_origin in front of the test TorchServe; yields its process."""
    run, port = torchserve.run_dir, int(demo_origin.rsplit(":", 1)[1])
    with running_demo(port, run / "config.properties", run / "key_file.json") as process:
        yield process


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 800, "height": 600})
    yield page
    page.close()


def drop(page, url, path):
    """Open the demo and give its file input one file, as choosing it in the picker does."""
    page.goto(url)
    page.set_input_files("#file", str(path))


def test_an_image_shows_the_servers_top5_as_bars(torchserve, demo, page, tmp_path):
    drop(page, demo.origin, FIXTURES / "cat.jpg")
    bars = page.locator("#bars .bar")
    expect(bars).to_have_count(5, timeout=WAIT_MS)
    rows = bars.evaluate_all("rows => rows.map(r => [r.dataset.class, Number(r.dataset.p),"
                             " r.querySelector('.pct').textContent])")
    page.screenshot(path=tmp_path / "demo-cat.png", full_page=True)
    names, probs, texts = zip(*rows)
    assert set(names) <= set(CIFAR10_CLASSES) and len(set(names)) == 5
    assert list(probs) == sorted(probs, reverse=True)
    answer = torchserve.predict(FIXTURES / "cat.jpg").json()  # the same image, not through the page
    assert list(names) == list(answer)
    assert list(probs) == pytest.approx(list(answer.values()), abs=1e-6)
    for text, p in zip(texts, probs):
        assert re.fullmatch(r"\d{1,3}\.\d %", text) and abs(float(text[:-2]) - 100 * p) <= 0.05
    assert page.locator("#preview").evaluate("img => img.complete && img.naturalWidth > 0")
    expect(page.get_by_role("alert")).to_be_hidden()


def test_a_file_that_is_not_an_image_shows_the_servers_400_message(torchserve, demo, page,
                                                                    tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: milk, eggs\n")
    refused = torchserve.predict(notes)
    assert refused.status_code == 400 and refused.json()["type"] == "BadRequest"
    drop(page, demo.origin, notes)
    expect(page.get_by_role("alert")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#error-title")).to_have_text("TorchServe refused this file")
    expect(page.locator("#error-text")).to_have_text(refused.json()["message"])
    expect(page.locator("#bars .bar")).to_have_count(0)


@pytest.mark.parametrize("fault", ["TorchServe down", "wrong token", "no key file",
                                   "demo server gone"])
def test_what_went_wrong_is_said_when_no_prediction_comes(torchserve, page, tmp_path, fault):
    run = torchserve.run_dir
    config, key_file = run / "config.properties", run / "key_file.json"
    if fault == "TorchServe down":  # a port nothing listens on
        config = tmp_path / "config.properties"
        config.write_text(f"inference_address=http://127.0.0.1:{free_port()}\n")
    elif fault == "wrong token":
        keys = json.loads(key_file.read_text())
        keys["inference"]["key"] = "not-the-token"
        key_file = tmp_path / "key_file.json"
        key_file.write_text(json.dumps(keys))
    elif fault == "no key file":
        key_file = tmp_path / "key_file.json"
    title, text = {
        "TorchServe down": ("TorchServe is not reachable", "is it running?"),
        "wrong token": ("TorchServe refused the demo's token", str(key_file.resolve())),
        "no key file": ("The demo has no inference token", str(key_file.resolve())),
        "demo server gone": ("Cannot reach the demo server", "is demo/serve.py still running?"),
    }[fault]
    with running_demo(free_port(), config, key_file) as process:
        page.goto(process.origin)
        if fault != "demo server gone":
            page.set_input_files("#file", str(FIXTURES / "cat.jpg"))
            expect(page.get_by_role("alert")).to_be_visible(timeout=WAIT_MS)
    if fault == "demo server gone":  # stopped under the open page
        page.set_input_files("#file", str(FIXTURES / "cat.jpg"))
        expect(page.get_by_role("alert")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#error-title")).to_have_text(title)
    expect(page.locator("#error-text")).to_contain_text(text)


def test_the_file_input_is_labelled_and_reached_with_the_keyboard(demo, page):
    page.goto(demo.origin)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    expect(page.get_by_label("Drop an image here")).to_have_attribute("type", "file")


def test_the_page_cannot_call_torchserve_itself_with_the_token(torchserve, demo, page):
    """Why demo/serve.py forwards: TorchServe 0.12 checks the token on the CORS preflight too,
    which browsers send without credentials, so the preflight gets 400 and the POST never goes."""
    url = f"{torchserve.inference}/predictions/cifar10"
    preflight = requests.options(url, timeout=10, headers={
        "Origin": demo.origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 400 and "Token Authorization failed" in preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == demo.origin  # CORS is configured
    page.goto(demo.origin)
    outcome = page.evaluate("""async ([url, auth]) => {
        try {
            const r = await fetch(url, {method: "POST", body: new Uint8Array([1]),
                headers: {Authorization: auth, "Content-Type": "application/octet-stream"}});
            return `HTTP ${r.status}`;
        } catch (err) { return String(err); }
    }""", [url, torchserve._token("inference")["Authorization"]])
    assert outcome == "TypeError: Failed to fetch"


def test_the_demo_server_is_for_its_own_page_on_loopback_only(torchserve, demo):
    listening = {c.laddr.ip for c in psutil.Process(demo.pid).net_connections()
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}
    predict, cat = f"{demo.origin}/predictions/cifar10", (FIXTURES / "cat.jpg").read_bytes()
    rebound = requests.get(f"{demo.origin}/config.json", headers={"Host": "evil.example"},
                           timeout=10)
    assert rebound.status_code == 403  # a DNS-rebinding page reaches it under a foreign name
    other_site = requests.post(predict, data=cat, headers={"Origin": "https://evil.example"},
                               timeout=10)
    assert other_site.status_code == 403
    token = torchserve._token("inference")["Authorization"].split()[1]
    for path in ("/", "/config.json"):  # the token stays in the server
        assert token not in requests.get(f"{demo.origin}{path}", timeout=10).text
    assert requests.post(predict, data=cat, headers={"Origin": demo.origin},
                         timeout=60).status_code == 200
