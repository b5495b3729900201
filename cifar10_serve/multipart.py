"""Multipart forms on /predictions: several images as form fields, read as TorchServe's worker gives
them or, where the proxy passed the body on unparsed, parsed here; answered as raw.py answers.
An HTML form's text fields are not images (a CSRF token, a button) unless they hold one.

Why the proxy passes forms on: TorchServe 0.12's Netty decoder keeps a copy of every body it
fails to decode in direct memory (15 s of 7 MB bad bodies left it answering every body over
~5 MB with 507 until restarted). So the proxy sends them as application/octet-stream with their
Content-Type in FORM_HEADER, and ``read_form`` parses them with python-multipart.
"""
import base64
import binascii
import contextlib
import quopri
import re

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from cifar10_serve import raw
from cifar10_serve.bodies import field_name, looks_like_json, numbered, read_json
from cifar10_serve.errors import bad_request, shown, too_many
from cifar10_serve.images import looks_like_image

# The request header the proxy puts a multipart request's own Content-Type in.
FORM_HEADER = "x-form-content-type"
PLAIN = {b"", b"7bit", b"8bit", b"binary"}
MAX_TEXT_FIELDS = 64  # an HTML form's own fields (tokens, buttons) read beside max_images images
WHITESPACE = re.compile(rb"\s+")

error = raw.error  # a form is a /predictions request: its errors are written alike


def read(payload, limits, spec):
    """(images, raw.Reply) of a form: ``payload`` is (fields, each field's content type or None
    where unknown ("" for text fields), the Content-Type of a body the proxy passed on, or None)."""
    fields, types, proxied = payload
    max_images = limits["max_images"]
    if proxied is not None:
        fields, types = read_form(fields, proxied, max_images + MAX_TEXT_FIELDS)
    if not fields:
        raise bad_request("the multipart body has no part TorchServe could read (text before "
                          "the first boundary, a preamble, makes it drop every part)"
                          if types is not None else "the request is empty")
    texts = {name for name in fields if types is not None and types.get(name) == ""}
    if len(fields) - len(texts) > max_images:
        raise too_many(len(fields) - len(texts), max_images)
    if len(texts) > max_images + MAX_TEXT_FIELDS:  # a form's own fields beside its images
        raise bad_request(f"the form has {len(texts)} text fields; at most "
                          f"{max_images + MAX_TEXT_FIELDS} are read", 413)
    images, as_list, text_fields = [], False, []
    for name, value in fields.items():
        if looks_like_json(value):  # a JSON part: not parsed by TorchServe (see the adapter)
            value = read_json(value, max_images, spec)
        if isinstance(value, (dict, list)):
            images += raw.json_images(value, len(images), max_images)
            as_list = as_list or isinstance(value.get("data"), list)
        elif name in texts and isinstance(value, (bytes, bytearray)):
            image = _text_image(value)
            images += [image] if image else []
            text_fields += [] if image else [field_name(name)]
            if len(images) > max_images:
                raise too_many(len(images), max_images)
        else:
            images.append(raw.one_image(name, value))
    if not images:
        raise bad_request(f"the form has no image: its fields {[shown(n) for n in text_fields]} "
                          f"are text (send the image as a file field, -F name=@cat.jpg, or as "
                          f"base64 text)")
    return images, raw.Reply(as_list or len(images) > 1)


def field_type(headers):
    """A field's content type, or None where a request header of its name (`accept`, `explain`) took
    its place in TorchServe's one dict of both."""
    return headers.get("content-type") if isinstance(headers, dict) else None


def _text_image(value):
    """The image a text field holds (its bytes, or base64), or None."""
    if looks_like_image(value):  # `curl -F "data=<cat.jpg"`: the file's bytes, no content type
        return bytes(value)
    if value.startswith(b"data:") and b"," in value[:256]:  # a data URL, as browsers produce
        value = value.split(b",", 1)[1]
    try:
        data = base64.b64decode(WHITESPACE.sub(b"", bytes(value)), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if looks_like_image(data) else None


def read_form(body, content_type, max_parts):
    """(fields, their content types, "" for text) of a multipart/form-data body, as TorchServe would
    give them, several numbered by position; a malformed body, or over ``max_parts``, a 400 (413).
    """
    if not isinstance(body, (bytes, bytearray)):
        raise bad_request(f"{FORM_HEADER} names the Content-Type of a multipart body sent as "
                          f"application/octet-stream (the proxy does so); this body was not")
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if kind != b"multipart/form-data" or not boundary:
        raise bad_request(f"{FORM_HEADER} is {shown(content_type)!r}: a multipart body needs "
                          f"multipart/form-data with a boundary")
    parts, ended = [], []
    header = {"field": b"", "value": b""}

    def on_header_end():
        parts[-1]["headers"][header["field"].strip().lower()] = header["value"].strip()
        header.update(field=b"", value=b"")

    def on_part_begin():
        if len(parts) >= max_parts:
            raise bad_request(f"the form has over {max_parts} parts; at most {max_parts} are "
                              f"read", 413)
        parts.append({"headers": {}, "data": []})

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": lambda data, start, end: header.update(
            field=header["field"] + data[start:end]),
        "on_header_value": lambda data, start, end: header.update(
            value=header["value"] + data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": lambda data, start, end: parts[-1]["data"].append(data[start:end]),
        "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise bad_request(f"the multipart body is malformed ({error}); send files as curl -F "
                          f"data=@cat.jpg or requests' files= do") from None
    if not ended:
        raise bad_request("the multipart body ends before its closing boundary "
                          f"(--{shown(boundary.decode('latin-1'))}--)")
    fields, types = {}, {}
    for position, part in enumerate(parts, 1):
        name, value, field_type = _field(part, position)
        name = numbered(name, position) if len(parts) > 1 else name
        fields[name], types[name] = value, field_type
    return fields, types


def _field(part, position):
    """(name, value, content type) of one part, its Content-Transfer-Encoding undone."""
    headers = part["headers"]
    disposition, options = parse_options_header(headers.get(b"content-disposition"))
    if disposition != b"form-data" or b"name" not in options:
        raise bad_request(f"part {position} of the form has no Content-Disposition: form-data "
                          f"with a name")
    name = options[b"name"].decode("utf-8", "replace")
    data = b"".join(part["data"])
    encoding = headers.get(b"content-transfer-encoding", b"").lower()
    try:
        if encoding == b"base64":
            data = base64.b64decode(re.sub(rb"\s+", b"", data), validate=True)
        elif encoding == b"quoted-printable":
            data = quopri.decodestring(data)
        elif encoding not in PLAIN:
            raise bad_request(f"part {position} of the form ({shown(name)!r}) has "
                              f"Content-Transfer-Encoding {shown(encoding.decode('latin-1'))!r};"
                              f" accepted: 7bit, 8bit, binary, base64, quoted-printable")
    except binascii.Error as error:
        raise bad_request(f"part {position} of the form ({shown(name)!r}) is not valid base64 "
                          f"({error})") from None
    if b"filename" not in options:  # a text field: TorchServe gives its bytes, no type
        return name, data, ""
    field_type = headers.get(b"content-type", b"application/octet-stream").decode("latin-1")
    if field_type.startswith("text"):  # TorchServe's worker decodes text/* where it can
        with contextlib.suppress(UnicodeDecodeError):
            data = data.decode("utf-8")
    return name, data, field_type
