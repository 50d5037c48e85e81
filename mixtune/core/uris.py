"""Tracking URIs may carry credentials (`https://user:secret@host`): never log, store or print those."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_uri(uri: str) -> str:
    """`https://user:secret@host/x` -> `https://user:***@host/x`: a URI as it may be logged or shown."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """A URI without its user:password, and the two (None when absent)."""
    parts = urlsplit(uri)
    if parts.username is None:
        return uri, None, None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host)), parts.username, parts.password
