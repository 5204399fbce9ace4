"""How ``bench`` reads streams, against a raw asyncio HTTP/1.1 server in its own process that sends SSE
events at known times and misbehaves on request: many concurrent streams, events in bursts, events split
into pieces, HTTP errors, errors in the stream, dropped connections, timeouts, and the headers sent."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from inference_course import bench, servers

FIRST_S = 0.02  # first token after this long
GAP_S = 0.01  # then one token every GAP_S

# The behaviour of one request is chosen by its prompt (completions) or its last message (chat).
# Responses use chunked transfer encoding on keep-alive connections, as uvicorn does.
SERVER = textwrap.dedent('''
    import asyncio, json, sys

    FIRST_S, GAP_S = float(sys.argv[1]), float(sys.argv[2])
    STATE = {"connections": 0, "requests": 0, "in_flight": 0, "max_in_flight": 0, "last_headers": {}}


    def event(obj):
        return b"data: " + json.dumps(obj).encode() + b"\\n\\n"


    def token(i, chat, text=None):
        text = f" t{i}" if text is None else text
        if chat:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            return {"id": "r", "object": "chat.completion.chunk", "choices": [choice]}
        return {"id": "r", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


    def usage(n, prompt_tokens=3):
        return {"id": "r", "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                     "total_tokens": prompt_tokens + n}}


    class Stream:
        def __init__(self, writer, status=200, content_type="text/event-stream"):
            self.writer = writer
            writer.write(f"HTTP/1.1 {status} X\\r\\ncontent-type: {content_type}\\r\\n"
                         "transfer-encoding: chunked\\r\\n\\r\\n".encode())

        async def send(self, data):
            self.writer.write(b"%x\\r\\n%s\\r\\n" % (len(data), data))
            await self.writer.drain()

        async def end(self):
            self.writer.write(b"0\\r\\n\\r\\n")
            await self.writer.drain()


    async def respond(writer, status, payload, content_type="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\\r\\ncontent-type: {content_type}\\r\\n"
                     f"content-length: {len(body)}\\r\\n\\r\\n".encode() + body)
        await writer.drain()


    async def serve(request, writer):
        """Answer one request; False when the connection must be dropped."""
        chat = "messages" in request
        what = request["messages"][-1]["content"] if chat else request["prompt"]
        n = request.get("max_completion_tokens") or request.get("max_tokens") or 4
        if what == "http-400":
            await respond(writer, 400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                                  "param": None, "code": 400}})
            return True
        if what == "http-503":
            await respond(writer, 503, b"server overloaded, retry later", "text/plain")
            return True
        if what == "json-body":  # a server that ignored stream=true
            await respond(writer, 200, {"choices": [{"index": 0, "text": "whole answer"}]})
            return True
        stream = Stream(writer)
        await asyncio.sleep(FIRST_S)
        if what == "burst":  # 5 events in one write, a pause, 5 more in one write
            await stream.send(b"".join(event(token(i, chat)) for i in range(5)))
            await asyncio.sleep(0.05)
            await stream.send(b"".join(event(token(i, chat)) for i in range(5, 10)) + event(usage(10)))
        elif what == "split":  # CRLF, a ping comment, an event field, two data lines, UTF-8, 7-byte pieces
            text = (": ping\\r\\n\\r\\n"
                    + "event: message\\r\\ndata: " + json.dumps(token(0, chat, " caf\\u00e9"), ensure_ascii=False)
                    + "\\r\\n\\r\\n"
                    + "data: " + json.dumps(token(1, chat, " \\u4e2d\\u6587"), ensure_ascii=False, indent=1)
                      .replace("\\n", "\\r\\ndata: ") + "\\r\\n\\r\\n"
                    + "id: 7\\r\\ndata: " + json.dumps(token(2, chat)) + "\\r\\n\\r\\n"
                    + "data: " + json.dumps(usage(3)) + "\\r\\n\\r\\n")
            raw = text.encode()
            for i in range(0, len(raw), 7):
                await stream.send(raw[i:i + 7])
                await asyncio.sleep(0.001)
        elif what == "no-tokens":
            await stream.send(event(usage(0)))
        elif what == "error-event":
            await stream.send(event(token(0, chat)))
            await stream.send(event({"error": {"object": "error", "message": "engine died mid-stream",
                                               "type": "InternalServerError", "code": 500}}))
        elif what == "not-json":
            await stream.send(event(token(0, chat)))
            await stream.send(b"data: this is not json\\n\\n")
        elif what == "drop":  # two tokens, then the connection goes away mid-response
            await stream.send(event(token(0, chat)) + event(token(1, chat)))
            await asyncio.sleep(0.01)
            writer.transport.abort()
            return False
        elif what == "no-done":  # a last event without its blank line, then the end of the response
            await stream.send(event(token(0, chat)) + b"data: " + json.dumps(token(1, chat)).encode())
        else:  # "steady" (or anything else): n tokens GAP_S apart, usage, [DONE]
            gap = 0.1 if what == "slow" else GAP_S
            for i in range(n):
                if i:
                    await asyncio.sleep(gap)
                await stream.send(event(token(i, chat)))
            await stream.send(event(usage(n)))
        if what not in ("no-done",):
            await stream.send(b"data: [DONE]\\n\\n")
        await stream.end()
        return True


    async def handle(reader, writer):
        STATE["connections"] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\\r\\n\\r\\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\\r\\n")
                path = lines[0].split(" ")[1]
                headers = dict((k.strip().lower(), v.strip()) for k, v in
                               (line.split(":", 1) for line in lines[1:] if ":" in line))
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if path == "/stats":
                    await respond(writer, 200, STATE)
                    continue
                STATE["requests"] += 1
                STATE["last_headers"] = headers
                STATE["in_flight"] += 1
                STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
                try:
                    keep = await serve(json.loads(body), writer)
                finally:
                    STATE["in_flight"] -= 1
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()


    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()


    asyncio.run(main())
''')


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    script = tmp_path_factory.mktemp("sse_server") / "sse_server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(FIRST_S), str(GAP_S)], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stats(url) -> dict:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url + "/stats", data=b"{}", headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=5) as response:
        return json.loads(response.read())


# -- many streams at once ----------------------------------------------------------------------------

def test_64_concurrent_streams_report_the_servers_token_gap_not_the_clients_reading_pace(url):
    n, tokens = 64, 20
    before = stats(url)
    results, duration = bench.run(url, "m", ["steady"] * n, concurrency=n, max_tokens=tokens)
    after = stats(url)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert all(r.output_tokens == tokens and len(r.itl) == tokens - 1 for r in results)
    s = bench.summarize(results, duration)
    # The server sleeps GAP_S (10 ms) between tokens; asyncio wakes late, never early. A client that read
    # the streams in bursts would report a median far below it; a starved one far above.
    assert 5 <= s["median_itl_ms"] <= 30, s["median_itl_ms"]
    assert FIRST_S * 1000 <= s["median_ttft_ms"] < 500, s["median_ttft_ms"]
    assert after["requests"] - before["requests"] == n  # the warm-up did not go to this server
    assert after["max_in_flight"] >= n  # all 64 streams were open at the same time


def test_one_connection_per_request_in_flight_kept_alive_between_requests(url):
    before = stats(url)
    results, _ = bench.run(url, "m", ["steady"] * 24, concurrency=8, max_tokens=3)
    after = stats(url)
    assert all(r.ok for r in results)
    assert after["requests"] - before["requests"] == 24
    # A pool of `concurrency` connections, reused (the second stats() call is one more connection).
    assert after["connections"] - before["connections"] - 1 <= 8


def test_events_that_arrive_together_share_one_timestamp(url):
    results, duration = bench.run(url, "m", ["burst", "burst"], concurrency=2, max_tokens=10)
    assert all(r.ok and r.output_tokens == 10 for r in results), [r.error for r in results]
    for r in results:
        assert len(r.itl) == 9
        inside = r.itl[:4] + r.itl[5:]  # gaps between events of one write
        assert np.median(inside) < 0.002, r.itl
        assert 0.04 <= r.itl[4] < 0.5, r.itl  # the 50 ms pause between the two writes


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_events_split_into_pieces_with_crlf_comments_fields_and_utf8(url, api):
    results, _ = bench.run(url, "m", ["split"], api=api, concurrency=1, max_tokens=3)
    (r,) = results
    assert r.ok, r.error
    assert (r.output_tokens, r.prompt_tokens, len(r.itl)) == (3, 3, 2)
    assert r.latency == pytest.approx(r.ttft + sum(r.itl), abs=1e-9)


def test_a_last_event_without_its_blank_line_is_still_read(url):
    results, _ = bench.run(url, "m", ["no-done"], concurrency=1, max_tokens=2)
    (r,) = results
    assert r.ok and r.output_tokens == 2 and len(r.itl) == 1, r  # no usage: text chunks are counted


# -- failures ----------------------------------------------------------------------------------------

def test_failures_are_described_and_kept_out_of_the_statistics(url):
    prompts = ["steady", "http-400", "steady", "http-503", "no-tokens", "error-event", "not-json", "drop",
               "json-body", "steady"]
    before = stats(url)
    results, duration = bench.run(url, "m", prompts, concurrency=4, max_tokens=5, timeout=30)
    assert stats(url)["requests"] - before["requests"] == len(prompts)  # no retries
    errors = dict(zip(prompts, (r.error for r in results)))
    assert [r.ok for r in results] == [p == "steady" for p in prompts], errors
    assert errors["http-400"] == "HTTP 400: max_tokens is too large"
    assert errors["http-503"] == "HTTP 503: server overloaded, retry later"
    assert errors["no-tokens"] == "the stream ended without any token chunk"
    assert errors["error-event"] == "error event in the stream: engine died mid-stream"
    assert "not JSON" in errors["not-json"] and "this is not json" in errors["not-json"]
    assert errors["drop"].startswith("connection error: the connection broke"), errors["drop"]
    assert errors["json-body"] == "the stream ended without any token chunk (content-type: application/json)"

    s = bench.summarize(results, duration)
    ok = [r for r in results if r.ok]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (3, 7, 15)
    assert s["mean_ttft_ms"] == pytest.approx(np.mean([r.ttft for r in ok]) * 1000)
    assert s["median_ttft_ms"] >= FIRST_S * 1000  # the errors answered at once are not in it
    assert len([g for r in ok for g in r.itl]) == 3 * 4


def test_timeout_and_connection_refused(url):
    results, _ = bench.run(url, "m", ["slow"], concurrency=1, max_tokens=20, timeout=0.3)
    (r,) = results
    assert not r.ok and r.error == "timeout: no complete response within 0.3 s"
    assert FIRST_S <= r.ttft < 0.3 <= r.latency < 1.0  # what arrived before the timeout is kept

    nowhere = f"http://127.0.0.1:{servers.free_port()}"
    results, duration = bench.run(nowhere, "m", ["x", "y"], concurrency=2, max_tokens=2, timeout=5)
    assert all(not r.ok and r.error.startswith("connection error: cannot connect to 127.0.0.1:") for r in results)
    assert bench.summarize(results, duration)["failed"] == 2


# -- what is sent ------------------------------------------------------------------------------------

def test_headers_api_key_and_body(url, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bench.run(url, "m", ["steady"], concurrency=1, max_tokens=2)
    assert stats(url)["last_headers"]["authorization"] == "Bearer EMPTY"

    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    bench.run(url, "m", ["steady"], concurrency=1, max_tokens=2, headers={"X-Request-Id": "run-7"})
    sent = stats(url)["last_headers"]
    assert sent["authorization"] == "Bearer from-env" and sent["x-request-id"] == "run-7"
    assert sent["content-type"] == "application/json"

    bench.run(url, "m", ["steady"], concurrency=1, max_tokens=2, api_key="k1")
    assert stats(url)["last_headers"]["authorization"] == "Bearer k1"
    bench.run(url, "m", ["steady"], concurrency=1, max_tokens=2, api_key="k1",
              headers={"Authorization": "Bearer gateway-token"})
    assert stats(url)["last_headers"]["authorization"] == "Bearer gateway-token"  # headers win


def test_request_body_matches_vllm_bench_serve():
    body = json.loads(bench._request_body("m", [1, 2, 3], False, 7, 0.0, True))
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 7, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
    body = json.loads(bench._request_body("m", "hi", True, 7, None, False))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7,
                    "stream": True, "stream_options": {"include_usage": True}}


# -- the SSE reader on its own -------------------------------------------------------------------------

STREAM = (b": ping\r\n\r\ndata: {\"a\": 1}\r\n\r\nevent: x\nid: 3\ndata: {\"b\":\ndata: 2}\n\n"
          b"data: {\"c\": \"\xc3\xa9\"}\n\ndata: [DONE]\n\n")
EXPECTED = [b'{"a": 1}', b'{"b":\n2}', b'{"c": "\xc3\xa9"}', b"[DONE]"]


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 7, 64, len(STREAM)])
def test_sse_reader_gives_the_same_events_however_the_bytes_are_cut(piece):
    reader = bench._SSEReader()
    events = []
    for i in range(0, len(STREAM), piece):
        events += reader.feed(STREAM[i:i + piece])
    events += reader.close()
    assert events == EXPECTED


def test_sse_reader_close_returns_an_unterminated_last_event():
    reader = bench._SSEReader()
    assert reader.feed(b'data: {"x": 1}\n\ndata: {"y"') == [b'{"x": 1}']
    assert reader.feed(b": 2}\n") == []
    assert reader.close() == [b'{"y": 2}']
    assert reader.close() == []


# -- the warm-up ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_warm_up_runs_the_measured_code_path_against_a_local_socket(chat):
    import asyncio

    result = asyncio.run(bench._warm_up_client(chat))
    assert result is not None and result.ok, result
    assert (result.output_tokens, result.prompt_tokens, len(result.itl)) == (2, 1, 1)
