"""README.md and docs/ as a contract: every relative link resolves (anchors too), no page carries
history a reader cannot open, every block marked runnable runs as written against a real
TorchServe behind the proxy, and the OpenAPI description the proxy serves holds against
schemathesis.

A block is runnable where the line before its fence is `<!-- runnable -->`. Shell blocks run in
bash (-e, -o pipefail) from the repository root; Python blocks in this venv's Python, from the
repository root. Both get HOST (the proxy's inference address) and TOKEN (the inference token) in
their environment, as the pages' set-up lines define them. The served model is the colour net of
conftest.py (its answers tell images apart), so a snippet checks what holds for any model.
"""
import base64
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
import requests
import torch

import proxy
from cifar10_serve import spec, v2
from tests.harness import local_proxy
from test_serving import torchserve

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(NGINX is None and not os.environ.get("CI"),
                                 reason="the snippet tests need nginx (apt-get install nginx)")
FENCE = re.compile(r"^(`{3,})(\w*)\s*$")
MARKER = "<!-- runnable -->"
SNIPPET_SECONDS = 120


# ---- reading the pages ----------------------------------------------------------------------------

def blocks(page):
    """(line number, language, code, runnable) of each fenced block of ``page``."""
    found, lines, index = [], page.read_text().splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening:
            start, fence = index, opening[1]
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == fence)
            before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
            found.append((start + 1, opening[2], "\n".join(lines[start + 1:end]) + "\n",
                          before.strip() == MARKER))
            index = end
        index += 1
    return found


def prose(page):
    """The page's text outside fenced blocks."""
    text, out, fence = page.read_text(), [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening[1]
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            out.append(line)
    return "\n".join(out)


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m[1] or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    return {slug(line.lstrip("#")) for line in prose(page).splitlines()
            if re.match(r"#{1,6} ", line)}


RUNNABLE = [(page, line, lang, code) for page in PAGES for line, lang, code, runnable
            in blocks(page) if runnable]


# ---- links and words -------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_anchors_included(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.name}: links that do not resolve: {broken}"


def test_the_front_page_and_the_pages_stay_short_and_carry_no_history():
    """README is the front page; docs/ one topic a page; no issue numbers, finding ids or minute
    timestamps a reader cannot open (dated evidence lives beside bench/results/)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    history = re.compile(r"issue [0-9]|F[0-9]\b|[0-9]{2}:[0-9]{2} UTC")
    for page in PAGES:
        lines = page.read_text().splitlines()
        assert page.name == "README.md" or len(lines) <= 400, (page.name, len(lines))
        assert not [line for line in lines if history.search(line)], page.name


def test_readme_names_the_test_commands_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for command in ("make test", "make docker-test"):
        assert command in ci and command in readme


def test_there_are_runnable_blocks_in_shell_and_python():
    assert {lang for _, _, lang, _ in RUNNABLE} == {"bash", "python"}
    assert any(page.name == "README.md" for page, *_ in RUNNABLE)


def test_the_openapi_description_and_its_page_are_what_the_script_writes():
    openapi_doc = SimpleNamespace(**runpy.run_path(str(ROOT / "docs" / "openapi_doc.py")))
    text = openapi_doc.spec_text()
    assert (ROOT / "deploy" / "nginx" / "openapi.json").read_text() == text, \
        "run python docs/openapi_doc.py"
    assert (ROOT / "docs" / "openapi.md").read_text() == openapi_doc.page(json.loads(text))
    served = json.loads(proxy.openapi("cifar10", 4, 8388608))
    assert served["openapi"].startswith("3.1") and "/predictions/cifar10" in served["paths"]
    assert "@" not in json.dumps(served["paths"])


def test_the_proxy_forwards_what_the_description_describes():
    """Every inference-port route the proxy's 404 names is described, and nothing else."""
    routes = re.findall(r"(GET|POST) (/[^\s,]*)", proxy.render({
        **proxy.settings_from(ROOT / "config.properties", ROOT / "handler" / "model-config.yaml"),
        "listen_inference": "127.0.0.1:1", "listen_management": "127.0.0.1:2",
        "run_dir": "/tmp/unused"}).split('"message": "this proxy forwards ')[1].split('"')[0])
    described = json.loads(proxy.openapi("cifar10", 4, 8388608))["paths"]
    forwarded = {(path, method.lower()) for method, path in routes}
    inference = {(path, method) for path, item in described.items() if "servers" not in item
                 for method in item if method in ("get", "post")}
    assert forwarded | {("/openapi.json", "get")} == inference


# ---- the served stack --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(colour_checkpoint, tmp_path_factory):
    """TorchServe serving the colour net, the proxy in front, and what the snippets need."""
    if NGINX is None:
        pytest.skip("the snippet tests need nginx (apt-get install nginx)")
    run = tmp_path_factory.mktemp("torchserve")
    with torchserve(colour_checkpoint, run) as ts:
        with local_proxy(ts, tmp_path_factory.mktemp("proxy")) as front:
            token = json.loads((run / "key_file.json").read_text())["inference"]["key"]
            front.env = dict(os.environ, HOST=urlsplit(front.inference).netloc, TOKEN=token)
            front.token = token
            front.metadata = v2.metadata(spec.from_checkpoint(
                torch.load(colour_checkpoint, weights_only=True)), "1.0")
            yield front


def run_snippet(lang, code, env):
    if lang == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SNIPPET_SECONDS)


@needs_nginx
@pytest.mark.parametrize("page, line, lang, code", RUNNABLE,
                         ids=[f"{p.relative_to(ROOT).as_posix()}:{n}" for p, n, *_ in RUNNABLE])
def test_every_runnable_block_runs_as_written(stack, page, line, lang, code):
    done = run_snippet(lang, code, stack.env)
    assert done.returncode == 0, (f"{page.name}:{line} ({lang}) exited {done.returncode}\n"
                                  f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n"
                                  f"{done.stderr[-3000:]}")


def snippet(page_name, containing):
    return next((lang, code) for page, _, lang, code in RUNNABLE
                if page.name == page_name and containing in code)


@needs_nginx
@pytest.mark.parametrize("page_name, containing, old, new", [
    # pixels that are not the server's decoding (here its channels in another order) answer
    # otherwise than the same files as BYTES; the colour net reads each channel's level, so it
    # cannot tell one resampling filter from another, which a real model can
    ("api.md", "decode_image", "np.asarray(decode_image(data))",
     "np.asarray(decode_image(data))[..., ::-1]"),
    # a route that is not served
    ("README.md", "/ping", "/predictions/cifar10", "/predictions/cifar100"),
    # a model the server does not hold
    ("api.md", "is_model_ready", "is_model_ready(\"cifar10\"", "is_model_ready(\"cifar100\""),
    # curl -T sends a PUT, which the proxy refuses (405)
    ("api.md", "top-5", "--data-binary @tests/fixtures/cat.jpg", "-T tests/fixtures/cat.jpg"),
])
def test_a_broken_copy_of_a_block_fails(stack, page_name, containing, old, new):
    """The snippet test fails when a block stops being true: each broken copy must fail."""
    lang, code = snippet(page_name, containing)
    assert old in code
    done = run_snippet(lang, code.replace(old, new, 1), stack.env)
    assert done.returncode != 0, done.stdout


# ---- schemathesis ------------------------------------------------------------------------------------

# The checks a response must pass. Not run: negative_data_rejection and positive_data_acceptance
# (a body the schema allows is still not an image: the description cannot say which bytes decode),
# ignored_auth and missing_required_header (a missing or wrong token is TorchServe's 400, not a
# 401, as described).
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,unsupported_method")
KNOWN = set()  # failures tolerated (none: every one fails the test)


@needs_nginx
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_description(stack,
                                                                                  tmp_path):
    """A few hundred generated requests (the description's examples, then fuzzing, valid and invalid, at most 100 per
    operation and mode) through the proxy, on the inference port (scaling calls would change the
    served model under the other tests)."""
    st = Path(sys.executable).parent / "st"
    done = subprocess.run(
        [str(st), "run", f"{stack.inference}/openapi.json", "--url", stack.inference,
         "-H", f"Authorization: Bearer {stack.token}", "--checks", CHECKS,
         "--exclude-path-regex", "^/models/", "--phases", "examples,fuzzing",
         "--max-examples", "100", "--seed", "1", "--workers", "2", "--mode", "all",
         "--request-timeout", "30", "--suppress-health-check", "all", "--continue-on-failure"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    out = done.stdout
    assert "Tested: 10" in out, out[-3000:]
    found = set(re.findall(r"^\s*- (ST\d+ .+?)\s*$", out, re.M))
    assert found <= KNOWN, out[-8000:] + done.stderr[-2000:]
    assert done.returncode == 0 or found, out[-8000:] + done.stderr[-2000:]
    print(re.search(r"Test cases:\s*\n\s*(.+)", out)[1])


@needs_nginx
@pytest.mark.parametrize("path", ["/predictions/cifar10", "/v2/models/cifar10/infer"])
def test_worker_answers_carry_a_content_type(stack, path):
    body = (ROOT / "tests" / "fixtures" / "cat.jpg").read_bytes()
    if "v2" in path:
        body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                       "data": [base64.b64encode(body).decode()]}]}).encode()
    answer = requests.post(stack.inference + path, data=body, timeout=30, headers={
        "Authorization": f"Bearer {stack.token}",
        "Content-Type": "application/json" if "v2" in path else "application/octet-stream"})
    assert answer.status_code == 200
    assert answer.headers.get("Content-Type", "").startswith("application/json")
