"""cifar10_serve/multipart.py: the multipart bodies the proxy passes on unparsed, read into the
fields TorchServe's frontend would have made of them (tests/test_proxy.py checks them served)."""
import base64

import pytest
from ts.utils.util import PredictionException

from cifar10_serve.multipart import read_form

FORM = "multipart/form-data; boundary=b0"


def body(*parts):
    """A multipart body of (headers, data) parts."""
    return b"".join(b"--b0\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"
                    for headers, data in parts) + b"--b0--\r\n"


def file_part(name, data, extra=b""):
    return (b'Content-Disposition: form-data; name="' + name + b'"; filename="x.png"\r\n'
            b"Content-Type: image/png" + extra, data)


def test_fields_are_numbered_typed_and_decoded_as_torchserve_gives_them():
    fields, types = read_form(body(
        file_part(b"data", b"\x89PNG\r\n\r\n--b1"),
        file_part(b"data", base64.b64encode(b"\x00\xff"), b"\r\nContent-Transfer-Encoding: base64"),
        (b'Content-Disposition: form-data; name="token"', b"abc")), FORM, max_parts=8)
    assert fields == {"data#1": b"\x89PNG\r\n\r\n--b1", "data#2": b"\x00\xff", "token#3": b"abc"}
    assert types == {"data#1": "image/png", "data#2": "image/png", "token#3": ""}
    fields, types = read_form(body(file_part(b"one", b"x")), FORM, max_parts=8)
    assert fields == {"one": b"x"} and types == {"one": "image/png"}  # alone: not numbered


@pytest.mark.parametrize("data,content_type,code,named", [
    (body(file_part(b"a", b"x")), "multipart/form-data", 400, "with a boundary"),
    (body(file_part(b"a", b"x"))[:-9], FORM, 400, "closing boundary"),
    (body((b"Content-Type: image/png", b"x")), FORM, 400, "no Content-Disposition"),
    (body(file_part(b"a", b"x", b"\r\nContent-Transfer-Encoding: gzip")), FORM, 400, "'gzip'"),
    (body(file_part(b"a", b"!!", b"\r\nContent-Transfer-Encoding: base64")), FORM, 400,
     "not valid base64"),
    (body(*[file_part(b"a", b"x")] * 4), FORM, 413, "at most 3"),
    ("text", FORM, 400, "application/octet-stream"),
])
def test_a_body_that_is_no_well_formed_form_is_refused_naming_why(data, content_type, code,
                                                                  named):
    with pytest.raises(PredictionException) as refused:
        read_form(data, content_type, max_parts=3)
    assert refused.value.error_code == code and named in refused.value.message
