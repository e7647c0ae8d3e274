"""Hostile and careless clients against a real server (issue 32): one test per attack, each
failing without its fix. Raw sockets where an HTTP client cannot express the attack."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from bench.servers import rss_mb
from service.bundle import BundleError, load
from service.config import Settings
from tests.service.conftest import RunningServer, serve, service_process, start_service
from tests.service.test_app import metric


@pytest.fixture(scope="module")
def guarded(trained_bundle: Path) -> RunningServer:
    """The tiny bundle behind client and admin keys, with the reload route on."""
    with serve(
        trained_bundle, api_keys=["client"], admin_api_keys=["admin"], admin_reload=True
    ) as running:
        yield running


CLIENT = {"Authorization": "Bearer client"}
# One /predict request as raw bytes, for attacks an HTTP client cannot express.
_BODY = b'{"inputs": "a fine film"}'
PREDICT = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


# -- item 4: no 500 from client input -------------------------------------------------------------
@pytest.mark.parametrize("inputs", ["<br />", ["<br />", "a fine film"], ""])
def test_an_explanation_of_a_text_with_no_tokens_is_answered(server: RunningServer, inputs):
    """If this fails, /explain answers 500 with a TorchScript traceback in the log for a text
    the tokenizer reads as nothing, which /predict scores (as one padding step)."""
    response = httpx.post(f"{server.url}/explain", json={"inputs": inputs}, timeout=60)
    if inputs == "":
        assert response.status_code == 422  # an empty string is refused by the schema
        return
    assert response.status_code == 200
    first = response.json()[0]
    assert first["tokens"] == []
    assert first["completeness"]["attribution_sum"] == 0.0
    predicted = httpx.post(f"{server.url}/predict", json={"inputs": "<br />"}).json()[0][0]
    assert first["label"] == predicted["label"]


# -- item 10: HEAD, and JSON that the parser gives up on ------------------------------------------
def test_head_on_a_get_route_answers_as_get_without_a_body(server: RunningServer):
    """If this fails, a load balancer's HEAD health check sees 405 and takes the pod out."""
    for path in ("/health", "/ready", "/metrics", "/info"):
        response = httpx.head(f"{server.url}{path}")
        assert response.status_code == 200, path
        assert response.content == b""
    assert httpx.head(f"{server.url}/predict").status_code == 405  # POST only, as before


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"inputs": "a", "parameters": {"top_k": ' + b"9" * 5000 + b"}}",
    ],
    ids=["nested-100k-deep", "5000-digit-integer"],
)
def test_json_the_parser_gives_up_on_is_400_invalid_json(server: RunningServer, body: bytes):
    """If this fails, such a body answers 422 "validation", where the README's table promises
    400 invalid_json for a body that is not usable JSON."""
    headers = {"content-type": "application/json"}
    response = httpx.post(f"{server.url}/predict", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error_type"] == "invalid_json"


# -- item 6: a card field that would break every answer -------------------------------------------
@pytest.mark.parametrize("field", ["version", "name"])
def test_a_card_whose_header_fields_hold_a_line_break_is_refused(
    trained_bundle: Path, tmp_path: Path, field: str
):
    """If this fails, the bundle loads (and reloads) fine, then every /predict gets an empty
    reply (an invalid header value) while /ready stays 200."""
    bundle = tmp_path / "broken"
    shutil.copytree(trained_bundle, bundle)
    card = json.loads((bundle / "card.json").read_text())
    card[field] = "2.0.0\r\nx-injected: 1"
    (bundle / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match=field):
        load(bundle, "cpu")


# -- item 8: auth that fails closed ---------------------------------------------------------------
@pytest.mark.parametrize("variable", ["SENTIMENT_API_KEYS", "SENTIMENT_ADMIN_API_KEYS"])
def test_a_key_variable_set_but_empty_stops_the_service(
    monkeypatch: pytest.MonkeyPatch, variable: str
):
    """If this fails, an unset ${VAR} in compose turns authentication off without a word."""
    monkeypatch.setenv(variable, " , ")
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("good-key\n  # an indented comment\n", None),
        ("\ufeffgood-key\n", None),  # a byte-order mark is not part of the first key
        ("good-key # rotated in May\n", "line 1"),
        ("# keys\ngood-key\nsecond key\n", "line 3"),
    ],
)
def test_a_keys_file_is_read_strictly(tmp_path: Path, content: str, problem: str | None):
    """If this fails, an indented comment becomes a valid key, a BOM breaks the first key, or
    'key # note' silently makes the key itself fail at every request."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(content, encoding="utf-8")
    if problem is None:
        keys = [k.get_secret_value() for k in Settings(api_keys_file=keys_file).api_keys]
        assert keys == ["good-key"]
    else:
        with pytest.raises(ValidationError, match=problem):
            Settings(api_keys_file=keys_file)


def test_two_authorization_headers_are_refused_whichever_would_match(guarded: RunningServer):
    """If this fails, the last of several Authorization headers wins: a proxy that appends
    its own header can be steered by the client's."""
    for order in (["Bearer client", "Bearer wrong"], ["Bearer wrong", "Bearer client"]):
        headers = [("authorization", value) for value in order]
        response = httpx.post(f"{guarded.url}/predict", json={"inputs": "x"}, headers=headers)
        assert response.status_code == 401
        assert "one Authorization header" in response.json()["error"]
    ok = httpx.post(f"{guarded.url}/predict", json={"inputs": "x"}, headers=CLIENT)
    assert ok.status_code == 200


def test_a_client_key_may_not_reload(guarded: RunningServer):
    """If this fails, any client may reload the model."""
    response = httpx.post(f"{guarded.url}/admin/reload", headers=CLIENT)
    assert response.status_code == 403
    assert response.json()["error_type"] == "forbidden"


def test_reloads_asked_for_at_once_are_merged(guarded: RunningServer):
    """If this fails, reloads queue one per request: a client spamming the route keeps the
    process loading models (/predict fell to 30% of its rate)."""
    import asyncio

    before = metric(guarded, "sentiment_model_reloads_total", result="succeeded")

    async def spam() -> list[int]:
        admin = {"Authorization": "Bearer admin"}
        async with guarded.async_client() as client:
            answers = await asyncio.gather(
                *(client.post("/admin/reload", headers=admin) for _ in range(12))
            )
        return [a.status_code for a in answers]

    assert asyncio.run(spam()) == [200] * 12
    done = metric(guarded, "sentiment_model_reloads_total", result="succeeded") - before
    assert 1 <= done <= 2  # the one running when the others came, and the one they joined


# -- item 9: start-up and shutdown edges ----------------------------------------------------------
def test_sighup_during_start_up_neither_kills_the_process_nor_is_lost(trained_bundle: Path):
    """If this fails, a rollout's SIGHUP reaching a pod that is still starting kills it
    without a log line (SIGHUP's default action)."""
    process, url = start_service(trained_bundle)
    try:
        time.sleep(0.5)  # past the interpreter's own start, into settings and the model load
        ready, sent = False, 0
        deadline = time.monotonic() + 60
        while not ready and process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.05)
            with contextlib.suppress(httpx.TransportError):
                ready = httpx.get(f"{url}/ready").status_code == 200
        assert process.poll() is None, process.communicate(timeout=10)[0]
        assert ready
        assert sent > 1
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert "SIGHUP during start-up" in output
    assert "reloaded" in output  # the request noted during start-up was answered


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Sends ``request``, reads one answer (head and content-length body): what came back
    before the answer ended or the connection did."""
    answer = b""
    with contextlib.suppress(OSError):
        sock.sendall(request)
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
        answer = head + b"\r\n\r\n" + body
    return answer


def test_a_keep_alive_request_sent_just_after_sigterm_is_answered(trained_bundle: Path):
    """If this fails, SIGTERM closes idle keep-alive connections at once, and a request a
    client sends on one just then meets a closed connection instead of an answer."""
    with service_process(trained_bundle) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert _exchange(sock, PREDICT).startswith(b"HTTP/1.1 200")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the server is shutting down: no longer accepting connections
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            answer = _exchange(sock, PREDICT)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"connection: close" in answer.lower()
            assert sock.recv(10) == b""  # then closed
        output = process.communicate(timeout=30)[0]
        assert process.returncode in (0, -signal.SIGTERM), output


# -- item 7: client behaviour counted as the server's failure -------------------------------------
def test_a_client_that_leaves_mid_body_is_not_counted_as_invalid_json(server: RunningServer):
    """If this fails, every client that disconnects while sending adds to
    sentiment_failures_total{reason="invalid_json"}, which pages nobody but misleads all."""
    before = metric(server, "sentiment_failures_total", route="/predict", reason="invalid_json")
    with socket.create_connection(("127.0.0.1", server.settings.port)) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs": "half a bo'
        )
        time.sleep(0.2)
    time.sleep(0.5)
    after = metric(server, "sentiment_failures_total", route="/predict", reason="invalid_json")
    assert after == before
    gone = metric(
        server, "sentiment_failures_total", route="/predict", reason="client_disconnected"
    )
    assert gone >= 1


def test_pipelined_requests_from_a_client_that_left_are_not_the_servers_failure(
    server: RunningServer, caplog: pytest.LogCaptureFixture
):
    """If this fails, a client that pipelines requests and closes logs "unhandled error" with
    tracebacks and adds to sentiment_failures_total{reason="backend"}: any client could page
    the on-call."""
    before = metric(server, "sentiment_failures_total", reason="backend")
    with caplog.at_level("ERROR", logger="service"):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.settings.port)) as sock:
                sock.sendall(PREDICT * 3)
        time.sleep(1.0)
    assert metric(server, "sentiment_failures_total", reason="backend") == before
    assert "unhandled error" not in caplog.text
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_pipelined_requests_from_a_client_that_left_log_no_error_in_the_served_process(
    trained_bundle: Path,
):
    """If this fails, `python -m service` (on uvloop, where writing to a closed connection
    raises) logs "ASGI callable returned without completing response" at ERROR for each
    client that pipelines requests and closes: a log alert pages the on-call for a client's
    behaviour."""
    with service_process(trained_bundle) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(PREDICT * 3)
        time.sleep(1.0)
        assert httpx.get(f"{url}/health").status_code == 200
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert not errors, output


# -- items 1 and 2: the connection's own bounds ---------------------------------------------------
def _bomb(port: int, megabytes: int) -> bytes:
    """An unterminated header of up to ``megabytes``; what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
        with contextlib.suppress(OSError):  # the server closes the connection mid-way
            for _ in range(megabytes * 16):
                sock.sendall(b"a" * 65536)
        with contextlib.suppress(OSError):
            return sock.recv(200)
    return b""


def test_an_unterminated_header_is_cut_off_with_431_and_holds_no_memory(trained_bundle: Path):
    """If this fails, uvicorn buffers a request head of any size: 50 connections sending a
    16 MB header took the process from 1.4 to 2.3 GB (the pod's limit is 2 GiB)."""
    with service_process(trained_bundle) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        idle = rss_mb(process.pid)
        answers = [_bomb(port, megabytes=4) for _ in range(10)]
        grown = rss_mb(process.pid) - idle
        assert all(a.startswith(b"HTTP/1.1 431") for a in answers), answers[0]
        assert grown < 30, f"{grown:.0f} MB more after 40 MB of headers"
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        assert httpx.get(f"{url}/health").status_code == 200
        # A large body is not a large head: 1.8 MB of review arrives in reads far above 64 KiB.
        review = {"inputs": "a fine film " * 150_000, "truncate": True}
        assert httpx.post(f"{url}/predict", json=review, timeout=60).status_code == 200


def test_connections_that_never_finish_a_request_are_closed_and_do_not_starve_health(
    trained_bundle: Path,
):
    """If this fails, connections with no request, half a head or half a body are held
    forever: under a low open-file limit 1,100 of them made every request fail, /health
    included. Here the process starts with a soft limit of 256 (it raises it to the hard
    limit) and 400 stalled connections come in: those that sent nothing are idle (closed by
    the keep-alive timeout), the others are past the read timeout (408)."""
    with service_process(
        trained_bundle, open_files=256, SENTIMENT_READ_TIMEOUT_S="2", SENTIMENT_KEEP_ALIVE_S="2"
    ) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        stalled = []
        for i in range(400):
            sock = socket.create_connection(("127.0.0.1", port))
            if i % 3 == 1:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Half: ")
            elif i % 3 == 2:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            stalled.append(sock)
        started = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
        time.sleep(3)  # past both timeouts
        closed = 0
        for sock in stalled:
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                answer = sock.recv(100)
                closed += answer == b"" or answer.startswith(b"HTTP/1.1 408")
            sock.close()
        assert closed == len(stalled)
        assert httpx.post(f"{url}/predict", json={"inputs": "fine"}).status_code == 200


def test_a_client_that_thinks_before_its_first_request_is_served_not_timed_out(
    trained_bundle: Path,
):
    """If this fails, a connection's first request must start within the read timeout of
    connecting: clients that open connections ahead and think before asking (the overload
    benchmark's 2,000 connections) got 408 for a request they sent whole and at once."""
    with service_process(
        trained_bundle, SENTIMENT_READ_TIMEOUT_S="1", SENTIMENT_KEEP_ALIVE_S="5"
    ) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            time.sleep(2)  # past the read timeout, within the keep-alive one
            assert _exchange(sock, PREDICT).startswith(b"HTTP/1.1 200")


# -- item 5: a request that could never be admitted -----------------------------------------------
def test_a_request_larger_than_the_queue_gets_413_naming_the_limit_not_429(trained_bundle: Path):
    """If this fails, a request with more texts than the queue can ever hold gets 429 with
    Retry-After on an idle server, and a retrying client loops forever."""
    with serve(trained_bundle, max_queue_texts=4, max_inputs_per_request=16) as server:
        response = httpx.post(f"{server.url}/predict", json={"inputs": ["fine"] * 5})
        assert response.status_code == 413
        assert "the limit is 4" in response.json()["error"]
        assert httpx.post(f"{server.url}/predict", json={"inputs": ["fine"] * 4}).status_code == 200


# -- item 3: a bounded /explain -------------------------------------------------------------------
def test_an_explanation_of_a_huge_text_lists_what_the_model_read_not_every_token(
    server: RunningServer,
):
    """If this fails, /explain of a 2 MB text answers with every one of its million tokens
    (72 MB, 600 MB more resident, /health stalled for seconds), and scores every sentence of
    it, though the model reads 32 tokens of the tiny bundle (400 of the shipped one)."""
    text = "Good film. " * 100_000  # 1.1 MB, 300,000 tokens, 100,000 sentences
    response = httpx.post(
        f"{server.url}/explain", json={"inputs": text, "truncate": True}, timeout=60
    )
    assert response.status_code == 200
    assert len(response.content) < 50_000
    (answer,) = response.json()
    assert len(answer["tokens"]) == 32
    assert answer["dropped_tokens"]["end"] - answer["dropped_tokens"]["start"] == 300_000 - 32
    assert len(answer["sentences"]) <= 32
