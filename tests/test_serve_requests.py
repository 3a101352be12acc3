"""The page's JSON API against hostile clients: exact, bounded, timed-out bodies, JSON only, same origin
only, and every bad request a 4xx. Raw sockets send what urllib refuses to; generated requests
(hypothesis) check that nothing gets a 5xx, hangs, or stops the server."""

import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmem.serve import ExplanationServer
from diffmem.serve.explainer import _check_prompt

TIMEOUT_S = 1.0


class StandInExplainer:
    """What the server needs of a PromptExplainer, with the real prompt checks and no model."""

    def info(self) -> dict:
        return {"model": "stand-in"}

    def explain(self, prompt) -> dict:
        _check_prompt(prompt)
        return {"prompt": prompt, "score": 1.0}

    def thumbnail(self, prompt) -> dict:
        _check_prompt(prompt)
        return {"prompt": prompt, "png": ""}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    served = ExplanationServer(StandInExplainer(), port=0, read_timeout_s=TIMEOUT_S)
    served.start()
    yield served
    served.stop()


def exchange(server, raw: bytes, wait_s: float = 5.0) -> tuple[int | None, bytes]:
    """Send ``raw`` on a new connection; (status, body) of the answer, or (None, b"") if none came."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=wait_s) as connection:
        connection.sendall(raw)
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and len(answer.split(b"\r\n\r\n", 1)[1]) >= _length(answer):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    if not answer.startswith(b"HTTP/"):
        return None, b""
    return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[-1]


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def post(body: bytes, headers: dict[str, str] | None = None, path: str = "/api/explain") -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))}
    fields |= headers or {}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


def still_serving(server) -> bool:
    status, body = exchange(server, b"GET /api/info HTTP/1.1\r\nHost: x\r\n\r\n")
    return status == 200 and json.loads(body)["model"] == "stand-in"


def test_a_good_request_is_answered(server):
    status, body = exchange(server, post(b'{"prompt": "a red sneaker"}'))
    assert status == 200 and json.loads(body)["prompt"] == "a red sneaker"


@pytest.mark.parametrize(
    ("length", "status"),
    [("-1", 411), ("abc", 411), (None, 411), ("+5", 411), ("99999999", 413), (str(16 * 1024 + 1), 413)],
)
def test_a_missing_negative_or_oversized_length_is_refused_unread(server, length, status):
    big = b'{"prompt": "' + b"x" * 200_000 + b'"}'
    answer, _ = exchange(server, post(big, {"Content-Length": length}))
    assert answer == status and still_serving(server)


def test_a_body_shorter_than_declared_times_out_instead_of_hanging(server):
    started = time.monotonic()
    status, body = exchange(server, post(b'{"prompt": "a"}', {"Content-Length": "500"}))
    assert status == 408 and b"the body ended after" in body and b"of 500 bytes" in body
    assert time.monotonic() - started < TIMEOUT_S + 3 and still_serving(server)


def test_a_client_that_sends_nothing_does_not_hold_a_thread(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port)) as silent:
        silent.settimeout(TIMEOUT_S + 3)
        assert silent.recv(1024) == b""  # the server closed it once its read timed out
    assert still_serving(server)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 8000 + b"]" * 8000, b"RecursionError"),
        (b'{"a":' * 1500, b"not JSON"),
        (b"\xff\xfe{}", b"not JSON"),
        (b'["a list"]', b"send a JSON object"),
        (b'{"prompt": 5}', b"the prompt must be a string"),
        (b'{"prompt": "a \\ud800 b"}', b"not valid text"),
    ],
    ids=["nested-8000", "unterminated-nesting", "not-utf8", "list", "number-prompt", "lone-surrogate"],
)
def test_bad_bodies_are_400(server, body, message):
    status, answer = exchange(server, post(body))
    assert status == 400 and message in answer


@pytest.mark.parametrize(
    "kind", ["text/plain", "application/x-www-form-urlencoded", None, "multipart/form-data"]
)
def test_only_json_is_accepted(server, kind):
    assert exchange(server, post(b'{"prompt": "a"}', {"Content-Type": kind}))[0] == 415
    assert (
        exchange(server, post(b'{"prompt": "a"}', {"Content-Type": "application/json; charset=utf-8"}))[0]
        == 200
    )


def test_requests_from_another_origin_are_refused(server):
    assert exchange(server, post(b'{"prompt": "a"}', {"Origin": "http://evil.example"}))[0] == 403
    assert exchange(server, post(b'{"prompt": "a"}', {"Sec-Fetch-Site": "cross-site"}))[0] == 403
    assert exchange(server, post(b'{"prompt": "a"}', {"Origin": "http://127.0.0.1"}))[0] == 200


HEADER_VALUES = st.one_of(
    st.none(),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    st.integers(-(10**12), 10**12).map(str),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=100).map(lambda p: json.dumps({"prompt": p}).encode()),
    st.integers(1, 3000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"),
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=BODIES,
    length=HEADER_VALUES,
    kind=st.sampled_from(["application/json", "text/plain", None]) | HEADER_VALUES,
    origin=HEADER_VALUES,
    path=st.sampled_from(["/api/explain", "/api/thumbnail", "/api/nope"]),
)
def test_no_generated_request_gets_a_5xx_hangs_or_stops_the_server(server, body, length, kind, origin, path):
    headers = {"Content-Type": kind, "Origin": origin}
    if length is not None:
        headers["Content-Length"] = length
    started = time.monotonic()
    status, _ = exchange(server, post(body, headers, path))
    assert status is not None and 200 <= status < 500
    assert time.monotonic() - started < TIMEOUT_S + 4
    assert still_serving(server)
