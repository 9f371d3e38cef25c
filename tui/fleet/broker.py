"""The broker `optd top --mqtt` connects to: mqtt://[USER:PASS@]HOST[:PORT] or mqtts://... (TLS).

The daemon parses the same URLs (optd.daemon.config.broker_address); this repeats the few lines instead
of importing the daemon, which the dashboard never does.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class Broker:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def label(self) -> str:
        """For the header and messages: never the password."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.scheme == "mqtts" else None


def parse_broker(url: str) -> Broker:
    """ValueError naming --mqtt and what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"--mqtt: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--mqtt: invalid port in {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"--mqtt: no host in {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--mqtt: {url!r} must not have a path or query (the topic prefix is --prefix)")
    return Broker(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme],
                  unquote(parts.username) if parts.username else None,
                  unquote(parts.password) if parts.password else None)


def check_prefix(prefix: str) -> str:
    """The topic prefix, as the daemon's `mqtt.topic_prefix` accepts it; ValueError naming --prefix."""
    levels = prefix.split("/")
    if not prefix or any(not level or any(c in level for c in "+#") for level in levels):
        raise ValueError(f"--prefix: topic levels joined by '/', no wildcards, none empty; got {prefix!r}")
    return prefix
