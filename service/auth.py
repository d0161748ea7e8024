"""Optional API-key authentication: ``Authorization: Bearer <key>`` when ``GLOWING_API_KEY`` is set.

Liveness and readiness stay open (``/livez``, ``/readyz`` and BentoML's liveness alias ``/healthz``)
so that orchestrators can probe without the secret, and so does the playground page (``/playground``: static,
no secret in it; its calls to the API carry the key typed into it); everything else, ``/metrics`` and the OpenAPI
page included, answers 401 without the key. The key is compared in constant time.
"""

from __future__ import annotations

import hmac

PLAYGROUND_PATH = "/playground"
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/healthz", PLAYGROUND_PATH})
CHALLENGE = (b"www-authenticate", b'Bearer realm="glowing"')


def authorized(scope: dict, key: bytes) -> bool:
    """True when no key is configured, the path is a probe, or the request carries the key."""
    if not key or scope["path"] in PUBLIC_PATHS:
        return True
    header = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            header = value
    scheme, _, token = header.strip().partition(b" ")
    # compare_digest's time does not depend on where the inputs differ (only on their length, not a secret)
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def key_bytes(secret) -> bytes:
    """The configured key (a pydantic ``SecretStr`` or None) as bytes; empty = authentication off."""
    return secret.get_secret_value().encode() if secret is not None else b""
