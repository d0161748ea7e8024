"""service/bentoml_compat.py: each BentoML workaround does its job, and the upstream behaviour it works
around is still there in the installed BentoML (milliseconds, no server).

The ``upstream_`` tests run BentoML's own code. When one fails after an upgrade, BentoML has changed what
the workaround is for: its message names the workaround to delete (or to re-check) in
service/bentoml_compat.py.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from service import bentoml_compat as compat


def fixed_upstream(workaround: str, what: str) -> str:
    return (f"BentoML {_version()} no longer {what}: delete workaround {workaround!r} from "
            f"service/bentoml_compat.py (and this test)")


def _version() -> str:
    import bentoml

    return bentoml.__version__


def test_the_patches_are_applied_on_the_tested_release_only(monkeypatch, caplog):
    import bentoml

    assert compat.supported() and compat.apply()  # the installed release is the tested one
    monkeypatch.setattr(bentoml, "__version__", "9.9.9")
    assert not compat.supported() and not compat.apply()
    assert "left off" in caplog.text and compat.TESTED in caplog.text


# ---- timeout-timers ---------------------------------------------------------------------------------

def _live_timers_after_requests(call) -> tuple[list, list]:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        sent = []

        async def send(message):
            sent.append(message)

        middleware = TimeoutMiddleware(app, timeout=120)
        for _ in range(5):
            await call(middleware, {"type": "http"}, None, send)
        loop = asyncio.get_running_loop()
        return sent, [h for h in loop._scheduled if not h.cancelled()]

    return asyncio.run(main())


def test_bentoml_timeout_timers_are_cancelled_when_a_request_ends():
    """BentoML's TimeoutMiddleware kept every request's context alive for the whole timeout."""
    import service.service  # noqa: F401  (applies the patch)
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    sent, live = _live_timers_after_requests(TimeoutMiddleware.__call__)
    assert len(sent) == 10 and live == []


def test_upstream_timeout_timers_outlive_their_requests():
    compat.apply()
    sent, live = _live_timers_after_requests(compat.ORIGINAL["TimeoutMiddleware.__call__"])
    assert len(sent) == 10
    assert len(live) == 5, fixed_upstream("timeout-timers", "leaves a timer per request")


# ---- abandoned-streams ------------------------------------------------------------------------------

class _Response:
    """An aiohttp response with a streamed body of three chunks, recording how it was let go."""

    def __init__(self):
        self.headers, self.closed, self.released = {}, False, False
        self.content = SimpleNamespace(iter_chunked=self._chunks, at_eof=lambda: False)

    async def _chunks(self, size):
        for chunk in (b"a", b"b", b"c"):
            yield chunk

    def close(self):
        self.closed = True

    def release(self):
        self.released = True


def _abandon(parse_stream_response) -> _Response:
    """Read one item of a three-chunk stream through ``parse_stream_response``, then leave it."""
    resp = _Response()
    client = SimpleNamespace(_deserialize_output=lambda payload, endpoint: payload)

    async def main():
        stream = parse_stream_response(client, None, resp)
        await anext(stream)
        await stream.aclose()

    asyncio.run(main())
    return resp


def test_an_abandoned_stream_closes_its_response():
    from _bentoml_impl.client import proxy2

    compat.apply()
    resp = _abandon(proxy2.AsyncClient._parse_stream_response)
    assert resp.closed and not resp.released


def test_upstream_abandoned_streams_keep_their_response_open():
    compat.apply()
    resp = _abandon(compat.ORIGINAL["AsyncClient._parse_stream_response"])
    assert not resp.closed and not resp.released, fixed_upstream("abandoned-streams",
                                                                 "leaves an abandoned stream's response open")


# ---- schema-per-response ---------------------------------------------------------------------------

def _schemas_built(mime_type, monkeypatch) -> tuple[str, int]:
    from _bentoml_sdk.io_models import IORootModel, ensure_io_descriptor

    answer = ensure_io_descriptor(list[float])  # what a model service's endpoint returns
    assert issubclass(answer, IORootModel)
    built = []
    real = answer.model_json_schema.__func__
    monkeypatch.setattr(answer, "model_json_schema", classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)))
    types = {mime_type.__get__(None, answer)() for _ in range(5)}  # five responses
    assert len(types) == 1
    return types.pop(), len(built)


def test_an_answer_media_type_is_found_once(monkeypatch):
    from _bentoml_sdk.io_models import IOMixin

    compat.apply()
    media_type, built = _schemas_built(IOMixin.__dict__["mime_type"], monkeypatch)
    assert media_type == "application/json" and built <= 1


def test_upstream_builds_a_json_schema_for_every_response(monkeypatch):
    compat.apply()
    media_type, built = _schemas_built(classmethod(compat.ORIGINAL["IOMixin.mime_type"].__func__), monkeypatch)
    assert media_type == "application/json"
    assert built == 5, fixed_upstream("schema-per-response", "builds a JSON schema to find each answer's media type")


# ---- unsampled-spans ---------------------------------------------------------------------------------

def _spans(sampler_class, rate: float, traceparent: str | None = None) -> tuple[bool, bool, int, bool]:
    """A tracer provider made as BentoML makes it (its sampler at this rate): whether a request's span
    and a child span are recorded, the request span's trace id, and whether it is sampled."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = TracerProvider(sampler=sampler_class(rate)).get_tracer("glowing-test")
    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None
    with tracer.start_as_current_span("request", context=context) as span:
        with tracer.start_as_current_span("http send") as child:
            ids = span.get_span_context()
            return span.is_recording(), child.is_recording(), ids.trace_id, ids.trace_flags.sampled


def test_spans_nobody_samples_are_not_recorded_but_keep_their_ids():
    from bentoml._internal.utils import telemetry

    compat.apply()
    patched = telemetry.ParentBasedTraceIdRatio
    recorded, child, trace_id, sampled = _spans(patched, 0.0)
    assert not recorded and not child and not sampled and trace_id != 0  # logs still get a trace id
    assert _spans(patched, 1.0)[:2] == (True, True)  # a sample rate set: BentoML's own sampler
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # an upstream that sampled the trace
    recorded, child, trace_id, sampled = _spans(patched, 0.0, caller)
    assert recorded and child and sampled and trace_id == 0x0AF7651916CD43DD8448EB211C80319C


def test_upstream_records_every_span_at_sample_rate_zero():
    compat.apply()
    recorded, child, _, sampled = _spans(compat.ORIGINAL["ParentBasedTraceIdRatio"], 0.0)
    assert not sampled
    assert recorded and child, fixed_upstream("unsampled-spans", "records the spans it never samples")


@pytest.mark.slow
def test_bentoml_makes_its_tracer_provider_with_the_patched_sampler():
    import subprocess
    import sys

    code = ("from service import bentoml_compat as c; c.apply(); "
            "from bentoml._internal.configuration.containers import BentoMLContainer as B; "
            "s = B.tracer_provider.get().sampler; print(type(s).__module__, s.should_sample(None, 7, 'x').decision)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["service.bentoml_compat", "Decision.DROP"], out.stdout + out.stderr


# ---- one-session, connection-closed -----------------------------------------------------------------

def test_model_services_keep_one_session():
    """BentoML's default (a new session every 100 requests, closing the old one under requests in
    flight) lost answers under load; see docs/LOADTESTS.md, "Soak"."""
    from service.service import GeneratorService, ScorerService

    for svc in (ScorerService, GeneratorService):
        assert svc.config["runner_connection"]["max_requests"] >= 2**31 - 1
        assert svc.config["runner_connection"]["max_age"] >= 1e9


def test_upstream_sessions_are_renewed_and_the_old_one_closed_under_its_requests():
    import inspect

    from _bentoml_impl.client.proxy2 import SessionManager

    defaults = inspect.signature(SessionManager).parameters
    assert (defaults["max_requests"].default, defaults["max_age"].default) == (100, 300.0), \
        fixed_upstream("one-session", "renews its sessions every 100 requests and 300 s by default; check")

    async def main():
        manager = SessionManager("http://127.0.0.1:9", timeout=1, headers={}, max_requests=1)
        first = await manager.get_session()  # a request in flight on it...
        await manager.get_session()
        renewed = await manager.get_session()  # ...and the manager moves on
        closed = first.closed
        await manager.close()
        return renewed is not first, closed

    renewed, closed = asyncio.run(main())
    assert renewed and closed, fixed_upstream("one-session", "closes a renewed session under its requests")


def test_a_connection_closed_while_reading_is_retried():
    calls = []

    async def flaky(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("Connection closed.")
        return [0.5] * len(batch)

    assert asyncio.run(compat.retrying(flaky, ["a"])) == [0.5] and len(calls) == 2

    async def bug(batch):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        asyncio.run(compat.retrying(bug, ["a"]))


def test_upstream_a_closed_connection_is_a_bare_runtime_error():
    from aiohttp.streams import StreamReader

    async def main():
        protocol = SimpleNamespace(connected=False, _reading_paused=False)
        reader = StreamReader(protocol, limit=2**16, loop=asyncio.get_running_loop())
        with pytest.raises(RuntimeError) as err:
            await reader.read()
        return err.value

    err = asyncio.run(main())
    assert type(err) is RuntimeError and str(err) == "Connection closed.", \
        fixed_upstream("connection-closed", "raises a bare RuntimeError('Connection closed.')")
    assert compat.connection_error(err)


# ---- list-wrapped-4xx -------------------------------------------------------------------------------

def test_bentoml_error_bodies_give_their_message():
    assert compat.error_message([{"error": "bad input"}]) == "bad input"
    assert compat.error_message({"error": "bad input"}) == "bad input"
    assert compat.error_message("plain") == "plain"


def test_upstream_4xx_messages_are_wrapped_in_a_list():
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml.exceptions import InvalidArgument
    from starlette.background import BackgroundTasks

    async def api_endpoint(name, request):
        raise InvalidArgument("bad input")

    class Request:
        url, method = SimpleNamespace(path="/score"), "POST"

        async def close(self):
            pass

    app = SimpleNamespace(api_endpoint=api_endpoint, _add_response_headers=lambda resp: None,
                          service=SimpleNamespace(context=SimpleNamespace(
                              response=SimpleNamespace(background=BackgroundTasks()))))
    resp = asyncio.run(ServiceAppFactory.api_endpoint_wrapper(app, "score", Request()))
    assert resp.status_code == 400
    assert json.loads(resp.body) == [{"error": "bad input"}], \
        fixed_upstream("list-wrapped-4xx", "wraps a 4xx message in a list")


# ---- error-schemas, index-page, half-gpu ------------------------------------------------------------

def test_upstream_openapi_documents_its_own_error_shapes():
    from _bentoml_sdk.service.openapi import error_responses

    assert set(error_responses) == {400, 404, 500}, fixed_upstream("error-schemas",
                                                                   "documents its own 400/404/500 shapes; check")
    assert compat.ERROR_SCHEMAS == ("InternalServerError", "InvalidArgument", "NotFound")


def test_upstream_openapi_page_has_its_title_and_a_tracker():
    from pathlib import Path

    import _bentoml_impl.server as server

    page = (Path(server.__file__).parent / "main-openapi.html").read_bytes()
    assert b"Google Tag Manager" in page, fixed_upstream("index-page", "loads Google Tag Manager on its page")
    ours = compat.index_page(page)
    assert b"<title>Glowing API</title>" in ours and b"googletagmanager" not in ours.lower()


def test_upstream_whole_gpus_go_to_different_devices():
    from _bentoml_impl.server.allocator import ResourceAllocator

    def place(request: float) -> list:
        alloc = ResourceAllocator()
        alloc.remaining_gpus, alloc._available_gpus = 1, [(1.0, 1.0)]
        with pytest.warns(ResourceWarning) if request >= 1 else _nothing():
            return [alloc.assign_gpus(request) for _ in range(2)]

    assert place(compat.gpu_resources("cuda")["gpu"]) == [[0], [0]]
    assert place(1) != [[0], [0]], fixed_upstream("half-gpu", "sends a second whole-GPU service to a GPU it lacks")
    assert compat.gpu_resources("cpu") is None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- the typed request ------------------------------------------------------------------------------

def test_an_endpoint_takes_the_request_model_that_admission_validated():
    from pydantic import BaseModel

    class EchoRequest(BaseModel):
        texts: list[str]
        n: int = 1

    spec = compat.validated_input(EchoRequest)
    assert spec.__name__ == "EchoRequestIODescriptor"  # as BentoML names it: the same schema as before
    assert spec.model_json_schema()["properties"] == EchoRequest.model_json_schema()["properties"]
    validated = EchoRequest(texts=["a"])
    http_request = SimpleNamespace(scope={compat.VALIDATED: validated})
    assert asyncio.run(spec.from_http_request(http_request, None)) is validated  # not parsed again

    class Echo:
        @compat.api("/echo", EchoRequest)
        async def echo(self, request: EchoRequest) -> dict:
            """Echo."""
            return {"model": type(request).__name__, "texts": request.texts, "n": request.n}

    method = Echo.__dict__["echo"]
    assert method.route == "/echo" and method.input_spec is not EchoRequest and method.doc == "Echo."
    assert asyncio.run(Echo().echo(texts=["b"])) == {"model": "EchoRequest", "texts": ["b"], "n": 1}  # keywords
    assert asyncio.run(Echo().echo(validated)) == {"model": "EchoRequest", "texts": ["a"], "n": 1}  # the model
