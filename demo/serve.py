"""Browser demo: a page where you drop an image and see the served model's top-5 as bars.

    python -m demo.serve [--port 8090] [--config config.properties] [--key-file key_file.json]
                         [--model NAME]
    # then open the URL it prints (TorchServe must be running: `make serve`)

Serves demo/index.html and config.json (the model's name and class names, asked of TorchServe's
management API: the model --model names, by default the one TorchServe serves), and forwards the
page's POST /predictions/<model> to TorchServe's inference_address (from --config) with the
inference token from --key-file (both read by client.py's TorchServeClient, the key file afresh
on every request).

Why it forwards instead of letting the page call TorchServe with CORS: TorchServe 0.12 checks the
token before anything else, also on the CORS preflight (OPTIONS) that a browser sends, without
credentials, before a cross-origin POST carrying an Authorization header; the preflight gets 400 and
the browser blocks the POST, whatever cors_allowed_* say. A same-origin POST needs no preflight,
and the token never reaches the browser.

Security: this server lends the inference token to whoever reaches it, so it listens on 127.0.0.1
only; keep it there (on a shared machine other local users can reach loopback too). It answers only
requests addressed to 127.0.0.1/localhost on its port (a DNS-rebinding page cannot use it) and
forwards only POSTs without an Origin or from its own origin (another site's page cannot either).
"""
import argparse
import json
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from client import TorchServeClient, read_properties

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("index.html")


class DemoServer(ThreadingHTTPServer):
    """The page, its config.json, and the forwarder to one TorchServe, on 127.0.0.1:port."""

    daemon_threads = True

    def __init__(self, port, config, key_file, model=None):
        super().__init__(("127.0.0.1", port), DemoHandler)
        port = self.server_address[1]  # the one the OS chose when port is 0
        self.url = f"http://127.0.0.1:{port}/"
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        self.origins = {f"http://{host}" for host in self.hosts}
        self.client = TorchServeClient(config, key_file, model=model)
        self.named, self.classes = model is not None, None
        # TorchServe's own default when config.properties does not set it
        self.max_body = int(read_properties(config).get("max_request_size", 6553500))

    def model(self):
        """The served model's name (--model's, or the first TorchServe lists) and its class
        names (the handler's describe), asked once TorchServe answers; (None, None) before."""
        if self.classes is None:
            client = self.client
            try:
                if not self.named:
                    listed = client._call("GET", f"{client.management}/models", "management",
                                          timeout=10).json()["models"]
                    client.model = listed[0]["modelName"]
                described = client._call(
                    "GET", f"{client.management}/models/{client.model}", "management",
                    params={"customized": "true"}, timeout=10).json()[0]
                custom = described["customizedMetadata"]  # a JSON string, or parsed
                self.classes = (json.loads(custom) if isinstance(custom, str)
                                else custom)["classes"]
            except (requests.RequestException, OSError, ValueError, KeyError, IndexError,
                    TypeError) as err:
                log.warning("cannot describe the served model yet (%s)", err)
                return (client.model if self.named else None), None
        return self.client.model, self.classes

    def page_config(self):
        model, classes = self.model()
        return {"predict_url": f"/predictions/{model}" if model else None, "model": model,
                "classes": classes, "torchserve": self.client.inference}


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "torchserve-demo"

    def do_GET(self):
        if not self._addressed_to_us():
            return
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/config.json":
            self._json(200, self.server.page_config())
        else:
            self._error(404, "NotFound", f"nothing at {self.path}: the demo is at /")

    def do_POST(self):
        if not self._addressed_to_us():
            return
        model, _ = self.server.model()
        # an unknown model (TorchServe down, no token): forwarding says which, as for a prediction
        if model is not None and self.path != f"/predictions/{model}":
            return self._error(404, "NotFound", f"POST images to /predictions/{model}")
        origin = self.headers.get("Origin")  # browsers send it with every POST; curl does not
        if origin is not None and origin not in self.server.origins:
            return self._error(403, "Forbidden", "only the demo page may use this server")
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            return self._error(411, "LengthRequired", "send the image as a body with a length")
        length = int(length)
        if length > self.server.max_body:
            self._discard(length)  # unread, a browser still sending sees a reset, not the 413
            return self._error(413, "PayloadTooLarge", f"the file has {length:,} bytes; "
                               f"TorchServe accepts up to {self.server.max_body:,}")
        self._forward(self.rfile.read(length))

    def _forward(self, body):
        client = self.server.client
        try:
            response = client.predict(body)
        except requests.RequestException as err:  # before OSError, which it subclasses
            return self._error(502, "Unreachable", f"TorchServe is not reachable at "
                               f"{client.inference} ({type(err).__name__}): is it running?")
        except OSError as err:  # no key file: TorchServe not started, or started elsewhere
            return self._error(503, "NoToken", f"cannot read the inference token from "
                               f"{client.key_file.resolve()} ({err.strerror or err}): start "
                               f"TorchServe (make serve) or pass --key-file")
        except (ValueError, KeyError) as err:
            return self._error(503, "NoToken", f"{client.key_file.resolve()} holds no inference "
                               f"token ({err!r})")
        if response.status_code == 400 and "InvalidKeyException" in response.text:
            return self._error(502, "TokenRefused", f"TorchServe at {client.inference} refused "
                               f"the token in {client.key_file.resolve()}: it is not the running "
                               f"server's (TorchServe writes a fresh key_file.json where it "
                               f"starts) or it expired (token_expiration_min)")
        self._send(response.status_code, response.content,
                   response.headers.get("Content-Type", "application/json"))

    def _discard(self, length):
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return
            length -= len(chunk)

    def _addressed_to_us(self):
        if self.headers.get("Host") in self.server.hosts:
            return True
        self._error(403, "Forbidden", f"this server answers only {sorted(self.server.hosts)}")
        return False

    def _error(self, code, kind, message):
        self._json(code, {"code": code, "type": kind, "message": message})

    def _json(self, code, payload):
        self._send(code, json.dumps(payload).encode(), "application/json")

    def _send(self, code, body, content_type):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8090,
                   help="port on 127.0.0.1 (0: any free one) (default: 8090)")
    p.add_argument("--config", default="config.properties",
                   help="TorchServe's config.properties (default: config.properties)")
    p.add_argument("--key-file", default="key_file.json",
                   help="TorchServe's token file (default: key_file.json)")
    p.add_argument("--model", help="the served model to call (default: the one TorchServe "
                                   "serves, the first it lists)")
    args = p.parse_args(argv)
    try:
        server = DemoServer(args.port, args.config, args.key_file, args.model)
    except OSError as err:
        p.error(f"cannot listen on 127.0.0.1:{args.port} ({err.strerror}): choose another --port")
    print(f"Open {server.url}  (predictions go to TorchServe at {server.client.inference}; "
          f"Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
