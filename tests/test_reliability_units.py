"""The API key check and the settings around it, without a server (milliseconds). The connection to the
model services: tests/test_bentoml_compat.py."""

from __future__ import annotations

import hmac

import pytest

from service import auth
from service.settings import get_settings

KEY = b"s3cret-key"


def scope(path: str = "/score", authorization: bytes | None = None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    return {"type": "http", "path": path, "headers": headers}


@pytest.mark.parametrize("header, ok", [
    (b"Bearer s3cret-key", True), (b"bearer s3cret-key", True), (b"BEARER  s3cret-key ", True),
    (None, False), (b"", False), (b"Bearer", False), (b"Bearer ", False), (b"s3cret-key", False),
    (b"Basic s3cret-key", False), (b"Bearer s3cret-ke", False), (b"Bearer s3cret-keyy", False),
    (b"Bearer S3CRET-KEY", False), (b"Token s3cret-key", False),
])
def test_only_the_bearer_key_passes(header, ok):
    assert auth.authorized(scope(authorization=header), KEY) is ok


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/playground"])
def test_probes_and_the_playground_page_need_no_key(path):
    assert auth.authorized(scope(path), KEY)


@pytest.mark.parametrize("path", ["/metrics", "/docs.json", "/", "/info", "/static_content/index.css",
                                  "/playground/x", "/playgroundx"])
def test_everything_else_needs_it(path):
    assert not auth.authorized(scope(path), KEY)


def test_no_key_configured_means_open():
    assert auth.authorized(scope("/score"), b"")
    assert auth.key_bytes(None) == b"" and auth.key_bytes(get_settings(api_key="").api_key) == b""


def test_the_comparison_is_constant_time(monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.authorized(scope(authorization=b"Bearer wrong"), KEY) is False
    assert calls == [(b"wrong", KEY)]


def test_the_key_is_read_from_the_environment_and_never_shown(monkeypatch):
    monkeypatch.setenv("GLOWING_API_KEY", "from-env-123")
    settings = get_settings()
    assert auth.key_bytes(settings.api_key) == b"from-env-123"
    assert "from-env-123" not in repr(settings) and "from-env-123" not in str(settings.model_dump())


def test_body_limit_default_and_override():
    s = get_settings()
    assert s.body_limit() == s.max_texts * (s.max_text_chars * 6 + 16) + 65_536
    assert get_settings(max_body_bytes=2_000_000).body_limit() == 2_000_000
    with pytest.raises(ValueError):
        get_settings(max_body_bytes=10)
