"""Multipart bodies the reverse proxy hands over unparsed (deploy/nginx/, README "Reverse proxy").

TorchServe 0.12's frontend parses multipart/form-data with Netty 4.1.53's decoder, which keeps
a copy of the body in direct memory whenever a body fails to decode (base64 parts, an empty
boundary, a part without Content-Disposition, a bogus charset...): 15 s of 7 MB such bodies left
TorchServe answering every body over ~5 MB with 507 until it was restarted. So the proxy sends a
multipart body on as application/octet-stream with its own Content-Type in FORM_HEADER, and the
handler reads the parts here, with python-multipart (the parser Starlette and FastAPI use):
fields as TorchServe would have given them, and a malformed body is that request's 400.
"""
import base64
import binascii
import contextlib
import quopri
import re

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from cifar10_serve.errors import bad_request, shown
from cifar10_serve.requests import numbered

# The request header the proxy puts a multipart request's own Content-Type in.
FORM_HEADER = "x-form-content-type"
PLAIN = {b"", b"7bit", b"8bit", b"binary"}


def read_form(body, content_type, max_parts):
    """({field name: value}, {field name: its content type, "" for a text field}) of a
    multipart/form-data ``body``, as TorchServe's frontend and worker give a form: a file part's
    bytes (str for text/*; JSON is parsed by requests.read_request), a text field's bytes;
    several fields numbered by position (data#1, data#2, as cifar10_serve.compat keeps
    repeated names). A body that is no well-formed form, or of more than ``max_parts`` parts,
    is a 400 (413) naming what is wrong."""
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
