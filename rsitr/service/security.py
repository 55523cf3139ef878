"""Who may reach the search service: loopback only, or anyone holding the bearer token (light: the CLI checks this
before it loads anything)."""

from __future__ import annotations

import hashlib
import ipaddress

from rsitr.errors import UserError

TOKEN_VARIABLE = "RSITR_API_TOKEN"


def token_digest(token: str) -> str:
    """The SHA-256 of a bearer token: what a service keeps and compares, so the token itself is never stored."""
    return hashlib.sha256(token.encode()).hexdigest()


class ServiceConfigError(UserError, ValueError):
    """A service that must not start as configured (e.g. reachable from other machines without a token)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def required_digest(host: str, token: str | None) -> str | None:
    """The digest of the token a service on ``host`` requires (None: none required, loopback only).

    Raises:
        ServiceConfigError: bound beyond loopback with no token.
    """
    if token:
        return token_digest(token)
    if not is_loopback(host):
        raise ServiceConfigError(
            f"--host {host} makes the service reachable from other machines: set {TOKEN_VARIABLE} to the bearer "
            "token clients must send, or bind 127.0.0.1"
        )
    return None
