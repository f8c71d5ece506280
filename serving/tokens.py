"""The bearer tokens both fronts check: read from a variable or a file, compared in constant time.

They come from STABLEMLP_AUTH_TOKEN / STABLEMLP_CONTROL_TOKEN or files (never a flag, so `ps` cannot
show them) and are never logged; grpc/auth.py and rest/guard.py ask `bearer_matches`.
"""

from __future__ import annotations

import hmac
from pathlib import Path

SCHEME = "bearer "  # RFC 6750; the scheme name is case-insensitive (RFC 7235)


def read_token(token: str, token_file: Path | None, variable: str) -> bytes | None:
    """The configured token, or None for no token auth; an empty one is a mistake, not 'off'."""
    if token_file is not None:
        token = token_file.read_text(encoding="utf-8")
    elif not token:
        return None
    token = token.strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        where = token_file or variable
        raise ValueError(f"auth token from {where}: expected one word of printable characters")
    return token.encode()


def bearer_matches(value: object, token: bytes) -> bool:
    """Whether an `authorization` value is `Bearer <token>` (constant-time comparison)."""
    if not isinstance(value, str):
        return False
    scheme, presented = value[: len(SCHEME)], value[len(SCHEME) :]
    return scheme.lower() == SCHEME and hmac.compare_digest(
        presented.encode(errors="surrogateescape"), token
    )


__all__ = ["SCHEME", "bearer_matches", "read_token"]
