"""The project's HTTP API as an OpenAPI 3.1 description, and its rendering as a Markdown page.

    python docs/openapi_doc.py          # writes deploy/nginx/openapi.json and docs/openapi.md

deploy/nginx/openapi.json is what the proxy serves at /openapi.json (proxy.py fills in the model
name and the limits, as it fills the nginx template); docs/openapi.md is that description read as
a page. tests/test_docs.py checks that both are what this script writes, and runs schemathesis
against the served description through the proxy.
"""
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC_FILE = ROOT / "deploy" / "nginx" / "openapi.json"
PAGE = ROOT / "docs" / "openapi.md"
M = "@MODEL@"  # the served model's name, filled in by proxy.py

JSON = "application/json"


def ref(name):
    return {"$ref": f"#/components/{name}"}


def error(description, headers=()):
    answer = {"description": description,
              "content": {JSON: {"schema": ref("schemas/Error")}}}
    if headers:
        answer["headers"] = {name: ref(f"headers/{name}") for name in headers}
    return answer


def errors(*codes):
    """The error answers of a route: each status the proxy, TorchServe or the handler may give."""
    known = {
        "400": error("not usable: the message says what was wrong and what is accepted; also a "
                     "missing or wrong token (InvalidKeyException) and control characters"),
        "404": error("the proxy forwards only this API's routes: the message lists them"),
        "405": error("another method than the route takes", ["Allow"]),
        "413": error("too many images or pixels, a body over max_request_size, or decoding "
                     "over max_decode_ms: the message names the limit"),
        "415": error("a body labelled application/x-www-form-urlencoded"),
        "429": error("over a per-client or all-clients limit of the proxy",
                     ["Retry-After"]),
        "431": error("the request line or a header is over 16 KiB"),
        "500": error("the server's fault while serving this request"),
        "503": error("the batch's budget was taken, TorchServe's queue is full, no worker is "
                     "up, or TorchServe did not answer", ["Retry-After"]),
        "507": error("the worker serving the request died twice (the proxy resends once)"),
    }
    return {code: known[code] for code in codes}


INFERENCE_ERRORS = ("400", "405", "413", "415", "429", "431", "500", "503", "507")
GET_ERRORS = ("400", "405", "429", "431", "503")


def image_bodies(examples):
    return {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "one encoded image"},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "description": "each file field an image, in order; repeated "
            "names keep every image",
            "additionalProperties": {"type": "string", "format": "binary"}}},
        JSON: {"schema": ref("schemas/JsonImages"), "examples": examples}}}


def inference_operation(summary, answer_schema, description, examples):
    return {
        "summary": summary, "description": description, "tags": ["inference"],
        "parameters": [ref("parameters/MinConfidence")],
        "requestBody": image_bodies(examples),
        "responses": {
            "200": {"description": "answered", "headers": {
                "X-Model-Version": ref("headers/X-Model-Version"),
                "X-Uncertain": ref("headers/X-Uncertain")},
                "content": {JSON: {"schema": answer_schema}}},
            **errors(*INFERENCE_ERRORS)}}


def health(summary, ready):
    statuses = {"200": {"description": "live" if not ready else "ready"}}
    if ready:
        statuses["400"] = {"description": "not ready (a worker TorchServe must run is not up), "
                           "or a missing or wrong token: an empty body, or the token error"}
        rest = errors("405", "429", "431", "503")
    else:
        rest = errors(*GET_ERRORS)
    return {"get": {"summary": summary, "tags": ["v2 health"],
                    "responses": {**rest, **statuses}}}


def document(cat_png_base64):
    data_example = {"one image": {"value": {"data": cat_png_base64}},
                    "KServe v1": {"value": {"instances": [{"data": cat_png_base64}]}}}
    v2_example = {"BYTES": {"value": {"id": "r1", "inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [1], "data": [cat_png_base64]}]}}}
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"}, "data": {}}}
    spec = {
        "openapi": "3.1.0",
        "info": {
            "title": f"{M} image classifier on TorchServe",
            "version": "1.0",
            "description": (
                "The HTTP API the proxy (nginx in front of TorchServe 0.12) serves for the model "
                f"{M}. Inference and health take the inference token of key_file.json as "
                "`Authorization: Bearer <key>` (where tokens are on); a missing or wrong one is "
                "a 400 InvalidKeyException, TorchServe's way. Every error is JSON with code, "
                "type and message; the proxy's own answers and v2 errors add \"error\". Guide: "
                "docs/api.md.")},
        "servers": [{"url": "/", "description": "the proxy's inference port (8000)"}],
        "security": [{"token": []}],
        "tags": [{"name": "inference"}, {"name": "v2 health"}, {"name": "v2 metadata"},
                 {"name": "management", "description": "the proxy's management port (8001), "
                  "with the management token"}],
        "paths": {
            f"/predictions/{M}": {"post": inference_operation(
                "Top classes of each image", ref("schemas/Predictions"),
                "The body is one image (raw, with a binary or image content type), multipart "
                "form fields, JSON {\"data\": base64 or [base64, ...]}, KServe v1 "
                "{\"instances\": [{\"data\" or \"b64\": base64}, ...]}. One image answers its "
                "top-5 classes, most probable first; several a list in request order; KServe v1 "
                "{\"predictions\": [...]}.", data_example)},
            f"/explanations/{M}": {"post": inference_operation(
                "Integrated Gradients of each image", {},
                "The same bodies as /predictions (at most max_explain_images images): per "
                "image the predicted class and an attribution map of the model's input size.",
                data_example)},
            f"/v2/models/{M}/infer": {"post": {
                "summary": "Open Inference Protocol v2 inference", "tags": ["inference"],
                "parameters": [ref("parameters/MinConfidence"),
                               {"name": "Inference-Header-Content-Length", "in": "header",
                                "required": False, "schema": {"type": "string",
                                                              "pattern": "^[0-9]{1,9}$"},
                                "description": "binary tensor data: the JSON header's length"}],
                "requestBody": {"required": True, "content": {
                    JSON: {"schema": ref("schemas/V2Request"), "examples": v2_example},
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                        "description": "the binary tensor data extension: a JSON inference "
                        "header of Inference-Header-Content-Length bytes, then the input's "
                        "bytes"}}},
                "responses": {
                    "200": {"description": "the outputs asked (default label and "
                            "probabilities), as JSON or binary tensor data", "headers": {
                                "X-Model-Version": ref("headers/X-Model-Version"),
                                "X-Uncertain": ref("headers/X-Uncertain"),
                                "Inference-Header-Content-Length":
                                    {"schema": {"type": "string"}, "description":
                                     "present when outputs come back as binary data"}},
                            "content": {JSON: {"schema": ref("schemas/V2Response")},
                                        "application/octet-stream": {
                                            "schema": {"type": "string",
                                                       "format": "binary"}}}},
                    **errors(*INFERENCE_ERRORS)}}},
            f"/v2/models/{M}/explain": {"post": {
                "summary": "Open Inference Protocol v2 explanation", "tags": ["inference"],
                "requestBody": {"required": True, "content": {
                    JSON: {"schema": ref("schemas/V2Request"), "examples": v2_example}}},
                "responses": {"200": {"description": "explanations", "content": {
                    JSON: {"schema": {}}}}, **errors(*INFERENCE_ERRORS)}}},
            "/ping": {"get": {
                "summary": "TorchServe's health", "tags": ["v2 health"],
                "responses": {
                    "200": {"description": "healthy", "content": {JSON: {"schema": {
                        "type": "object", "properties": {"status": {"type": "string"}}}}}},
                    "500": {"description": "short of workers", "content": {JSON: {
                        "schema": {"type": "object"}}}},
                    **errors(*GET_ERRORS)}}},
            "/v2/health/live": health("The server is live", ready=False),
            "/v2/health/ready": health("Every model has its workers up", ready=True),
            f"/v2/models/{M}/ready": health("The model has its workers up", ready=True),
            "/v2": {"get": {"summary": "Server metadata", "tags": ["v2 metadata"],
                            "responses": {"200": {"description": "name, version, extensions",
                                                  "content": {JSON: {"schema": ref(
                                                      "schemas/ServerMetadata")}}},
                                          **errors(*GET_ERRORS)}}},
            f"/v2/models/{M}": {"get": {
                "summary": "Model metadata", "tags": ["v2 metadata"],
                "description": "The served model's own answer, from the spec its checkpoint "
                "carries.",
                "responses": {"200": {"description": "the model's inputs and outputs",
                                      "headers": {"X-Model-Version":
                                                  ref("headers/X-Model-Version")},
                                      "content": {JSON: {"schema": ref(
                                          "schemas/ModelMetadata")}}},
                              **errors(*GET_ERRORS)}}},
            "/openapi.json": {"get": {
                "summary": "This description", "security": [], "tags": ["v2 metadata"],
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {JSON: {"schema": {"type": "object"}}}},
                              **errors("405", "429", "431")}}},
            f"/models/{M}": {
                "servers": [{"url": "http://127.0.0.1:8001",
                             "description": "the proxy's management port"}],
                "get": {"summary": "Describe the model", "tags": ["management"],
                        "parameters": [{"name": "customized", "in": "query",
                                        "schema": {"enum": ["true", "false"]}}],
                        "responses": {"200": {"description": "TorchServe's describe (with "
                                              "customized=true the handler's runtime, "
                                              "limits and budget)",
                                              "content": {JSON: {"schema": {
                                                  "type": "array"}}}},
                                      **errors("400", "404", "429", "503")}},
                "put": {"summary": "Scale the workers", "tags": ["management"],
                        "parameters": [
                            {"name": "min_worker", "in": "query", "required": True,
                             "schema": {"type": "integer", "minimum": 1,
                                        "maximum": "@MAX_WORKERS@"}},
                            {"name": "max_worker", "in": "query", "required": True,
                             "schema": {"type": "integer", "minimum": 1,
                                        "maximum": "@MAX_WORKERS@"},
                             "description": "at least min_worker"},
                            {"name": "synchronous", "in": "query",
                             "schema": {"enum": ["true", "false"]}}],
                        "responses": {"200": {"description": "scaled (synchronous) or "
                                              "accepted", "content": {JSON: {"schema": {
                                                  "type": "object"}}}},
                                      "202": {"description": "accepted", "content": {
                                          JSON: {"schema": {"type": "object"}}}},
                                      **errors("400", "404", "405", "429", "503")}}}},
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "key_file.json's inference key "
                                          "(management key on the management port)"}},
            "parameters": {"MinConfidence": {
                "name": "X-Min-Confidence", "in": "header", "required": False,
                "description": "answers carry X-Uncertain where an image's top-1 probability "
                "is below it; outside 0-1 is a 400",
                "schema": {"type": "string", "pattern": "^(0(\\.[0-9]{1,6})?|1(\\.0{1,6})?)$"}}},
            "headers": {
                "Retry-After": {"description": "seconds after which the request is worth "
                                "sending again", "schema": {"type": "string",
                                                            "pattern": "^[0-9]+$"}},
                "Allow": {"description": "the methods the route takes",
                          "schema": {"type": "string"}},
                "X-Model-Version": {"description": "the model version that answered (two "
                                    "answer at once during a release)",
                                    "schema": {"type": "string"}},
                "X-Uncertain": {"description": "with X-Min-Confidence: per image, in answer "
                                "order, true where its top-1 probability is below it",
                                "schema": {"type": "string",
                                           "pattern": "^(true|false)(, (true|false))*$"}}},
            "schemas": {
                "Error": {"type": "object", "required": ["code", "type", "message"],
                          "properties": {"code": {"type": "integer"},
                                         "type": {"type": "string"},
                                         "message": {"type": "string"},
                                         "error": {"type": "string"}}},
                "Top": {"type": "object", "description": "class name -> probability, most "
                        "probable first", "additionalProperties": {
                            "type": "number", "minimum": 0, "maximum": 1}},
                "Predictions": {"oneOf": [
                    ref("schemas/Top"),
                    {"type": "array", "items": ref("schemas/Top")},
                    {"type": "object", "required": ["predictions"], "properties": {
                        "predictions": {"type": "array"}}}]},
                "JsonImages": {"oneOf": [
                    {"type": "object", "required": ["data"], "additionalProperties": False,
                     "properties": {"data": {"oneOf": [
                         {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}},
                    {"type": "object", "required": ["instances"], "properties": {
                        "instances": {"type": "array", "items": {"type": "object"}}}}]},
                "V2Request": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "parameters": {"type": "object"},
                    "inputs": {"type": "array", "minItems": 1, "maxItems": 1,
                               "items": tensor},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"enum": ["label", "probabilities"]},
                                       "parameters": {"type": "object"}}}}}},
                "V2Response": {"type": "object", "required": ["model_name", "outputs"],
                               "properties": {
                                   "model_name": {"type": "string"},
                                   "model_version": {"type": "string"},
                                   "id": {"type": "string"},
                                   "parameters": {"type": "object"},
                                   "outputs": {"type": "array", "items": tensor}}},
                "ServerMetadata": {"type": "object", "required": ["name", "version",
                                                                  "extensions"],
                                   "properties": {"name": {"type": "string"},
                                                  "version": {"type": "string"},
                                                  "extensions": {"type": "array", "items": {
                                                      "type": "string"}}}},
                "ModelMetadata": {"type": "object",
                                  "required": ["name", "versions", "platform", "inputs",
                                               "outputs"],
                                  "properties": {"name": {"type": "string"},
                                                 "versions": {"type": "array", "items": {
                                                     "type": "string"}},
                                                 "platform": {"type": "string"},
                                                 "inputs": {"type": "array", "items": tensor},
                                                 "outputs": {"type": "array",
                                                             "items": tensor}}}}}}
    return spec


def cat_base64():
    import base64
    return base64.b64encode((ROOT / "tests" / "fixtures" / "cat.jpg").read_bytes()).decode()


def spec_text():
    return json.dumps(document(cat_base64()), indent=1) + "\n"


def page(spec):
    """The description as a Markdown page: each route, its parameters, bodies and answers."""
    spec = copy.deepcopy(spec)
    lines = ["# The API, as described by OpenAPI", "",
             "Generated by `python docs/openapi_doc.py` from the description the proxy serves "
             "at `/openapi.json` ([deploy/nginx/openapi.json](../deploy/nginx/openapi.json), "
             "with the model name and limits filled in by `proxy.py`). The guide to the same "
             "routes is [api.md](api.md).", "", spec["info"]["description"].replace(M, "cifar10"),
             ""]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "servers":
                continue
            where = " (management port)" if "servers" in item else ""
            lines += [f"## {method.upper()} {path.replace(M, 'cifar10')}{where}", "",
                      operation["summary"] + ".", ""]
            if operation.get("description"):
                lines += [operation["description"].replace(M, "cifar10"), ""]
            params = [spec["components"]["parameters"][p["$ref"].rsplit("/", 1)[-1]]
                      if "$ref" in p else p for p in operation.get("parameters", [])]
            if params:
                lines += ["Parameters: " + ", ".join(f"`{p['name']}` ({p['in']})"
                                                     for p in params) + ".", ""]
            body = operation.get("requestBody")
            if body:
                lines += ["Bodies: " + ", ".join(f"`{t}`" for t in body["content"]) + ".", ""]
            lines += ["| status | answer |", "|---|---|"]
            for status, answer in operation["responses"].items():
                headers = ", ".join(f"`{h}`" for h in answer.get("headers", {}))
                lines.append(f"| {status} | {answer['description']}"
                             + (f" (headers {headers})" if headers else "") + " |")
            lines.append("")
    lines += ["## Schemas", "", "The bodies' and answers' JSON schemas, as the description names "
              "them.", ""]
    for name, schema in spec["components"]["schemas"].items():
        lines += [f"### {name}", "", "```json", json.dumps(schema), "```", ""]
    return "\n".join(lines)


def main():
    text = spec_text()
    SPEC_FILE.write_text(text)
    PAGE.write_text(page(json.loads(text)))
    print(f"wrote {SPEC_FILE.relative_to(ROOT)} and {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
