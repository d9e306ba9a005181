"""Redis store URLs: the accepted schemes, their parts, and the same URL with its passwords hidden.

Pure parsing (no redis-py import), so a spec can be checked at start before anything connects or is created::

    redis://[[user]:password@]host[:port][/db][?options]             one server (rediss:// for TLS)
    unix://[[user]:password@]/path/to/redis.sock[?db=N]             one server on a Unix socket
    redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER_NAME[/db][?options]
    redis+cluster://[[user]:password@]host:port[,host:port...][?options]

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS for every connection (to the sentinels as well). The
credentials are the data nodes' (an ACL user or the default user's password); sentinels that require their own
take ``sentinel_username`` / ``sentinel_password``. Options (query parameters): the TLS ones of redis-py
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``), and
``min_replicas`` (acknowledge a write only once at least this many replicas hold it; see docs/store.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

SERVER_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
REDIS_SCHEMES = SERVER_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
STORE_OPTIONS = ("min_replicas", "sentinel_username", "sentinel_password")
SECRET_OPTIONS = ("password", "sentinel_password")
DEFAULT_PORTS = {"server": 6379, "sentinel": 26379, "cluster": 6379}

Topology = Literal["server", "sentinel", "cluster"]


class InvalidRedisUrl(ValueError):
    """A Redis store URL that cannot be used; the message never contains a password."""


@dataclass(frozen=True)
class RedisUrl:
    """A parsed Redis store URL.

    Attributes:
        topology: one server, a Sentinel-managed primary, or a Cluster.
        tls: whether every connection uses TLS.
        hosts: (host, port) of the server, the sentinels or the cluster's seed nodes (empty for ``unix://``).
        username: ACL user of the data nodes (None: the default user).
        password: their password (None: no AUTH).
        db: database number (always 0 in a Cluster).
        master: the Sentinel master name.
        tls_options: redis-py TLS keyword arguments from the query.
        min_replicas: replicas a write waits for at least (``WAIT``), even when fewer are known.
        sentinel_username: ACL user of the sentinels.
        sentinel_password: password of the sentinels.
        server_url: for ``server``, the URL redis-py's ``from_url`` receives (the store's own options removed).
    """

    topology: Topology
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    master: str | None = None
    tls_options: dict[str, str] = field(default_factory=dict)
    min_replicas: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    server_url: str = field(default="", repr=False)


def scheme_of(spec: str) -> str | None:
    """The scheme of a spec that looks like a URL (``something://...``), else None (a path)."""
    head, sep, _ = spec.partition("://")
    return head if sep else None


def accepted_schemes() -> str:
    return ", ".join(f"{s}://" for s in REDIS_SCHEMES)


def redact_url(url: str) -> str:
    """The URL with every password replaced by ``***`` (userinfo and the ``*password`` options), for logs and
    errors. Works on URLs that do not parse (several hosts, a bad port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:***@{host}"
    path = re.sub(r"((?:^|[?&])(?:sentinel_)?password=)[^&#]*", r"\1***", path)
    return f"{scheme}://{netloc}{slash}{path}"


def parse_redis_url(url: str) -> RedisUrl:
    """Parse and check a Redis store URL.

    Args:
        url: a URL of one of ``REDIS_SCHEMES``.

    Raises:
        InvalidRedisUrl: with a message that names the problem and shows the URL with its passwords hidden.
    """
    scheme = scheme_of(url)
    if scheme not in REDIS_SCHEMES:
        raise InvalidRedisUrl(f"unsupported store {redact_url(url)!r}: accepted schemes are {accepted_schemes()}")
    try:
        return _parse(url, scheme)
    except (ValueError, TypeError) as e:
        if isinstance(e, InvalidRedisUrl):
            raise
        raise InvalidRedisUrl(f"invalid store URL {redact_url(url)!r}: {e}") from None


def _parse(url: str, scheme: str) -> RedisUrl:
    tls = scheme.startswith("rediss")
    topology: Topology = (
        "sentinel" if scheme in SENTINEL_SCHEMES else "cluster" if scheme in CLUSTER_SCHEMES else "server"
    )
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    if "#" in query:
        raise ValueError("a fragment (#...) is not allowed")
    netloc, _, path = rest.partition("/")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    min_replicas = _non_negative(options.pop("min_replicas", "0"), "min_replicas")
    sentinel_username = options.pop("sentinel_username", None)
    sentinel_password = options.pop("sentinel_password", None)
    if topology == "server":
        if sentinel_username or sentinel_password:
            raise ValueError("sentinel_username and sentinel_password are for redis+sentinel:// URLs")
        return RedisUrl(
            "server", tls, _hosts(netloc, topology) if scheme != "unix" else (), username, password,
            min_replicas=min_replicas, server_url=_without_store_options(url),
        )  # fmt: skip
    unknown = set(options) - set(TLS_OPTIONS)
    if unknown:
        allowed = ", ".join((*TLS_OPTIONS, *STORE_OPTIONS))
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; accepted: {allowed}")
    if options and not tls:
        raise ValueError(f"TLS options need the rediss+{topology}:// scheme")
    hosts = _hosts(netloc, topology)
    parts = [p for p in path.split("/") if p]
    if topology == "sentinel":
        if not parts or len(parts) > 2:
            raise ValueError("the path must be /MASTER_NAME or /MASTER_NAME/DB")
        master, db = unquote(parts[0]), _non_negative(parts[1], "db") if len(parts) == 2 else 0
    else:
        if sentinel_username or sentinel_password:
            raise ValueError("sentinel_username and sentinel_password are for redis+sentinel:// URLs")
        if parts not in ([], ["0"]):
            raise ValueError("a Cluster has only database 0 (no path, or /0)")
        master, db = None, 0
    return RedisUrl(
        topology, tls, hosts, username, password, db, master, options, min_replicas, sentinel_username,
        sentinel_password,
    )  # fmt: skip


def _hosts(netloc: str, topology: Topology) -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]`` (IPv6 in brackets); the port defaults to the topology's usual one."""
    if not netloc:
        raise ValueError("no host")
    if topology == "server" and "," in netloc:
        raise ValueError("several hosts need redis+sentinel:// or redis+cluster://")
    out = []
    for item in netloc.split(","):
        parts = urlsplit(f"//{item}")
        if not parts.hostname:
            raise ValueError(f"bad host {item!r}")
        out.append((parts.hostname, parts.port or DEFAULT_PORTS[topology]))  # .port raises on a bad port
    return tuple(out)


def _non_negative(text: str, name: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{name} must be a non-negative integer, got {text!r}")
    return int(text)


def _without_store_options(url: str) -> str:
    """A one-server URL without the options only the store reads (redis-py would reject them)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k in STORE_OPTIONS for k, _ in query):
        return url
    kept = [(k, v) for k, v in query if k not in STORE_OPTIONS]
    return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote)))
