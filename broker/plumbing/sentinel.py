"""Redis behind Sentinel: the `redis+sentinel://` and `rediss+sentinel://` URLs, and their clients.

    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?option=value&...]

The hosts are the sentinels (port 26379 unless given; an IPv6 address goes in brackets), the
service is the name the sentinels monitor (`sentinel monitor <service> ...`), and the client asks
them where that service's primary is, before every new connection and again after a failover
(redis-py's `redis.sentinel`: `Sentinel.master_for`). `rediss+sentinel://` speaks TLS to the
sentinels and to the servers alike; the `ssl_*` options are the ones a `rediss://` URL takes.

The user and password are the servers' (as in a `redis://` URL; `$OPTUNA_RQ_REDIS_PASSWORD` or
`$OPTUNA_RQ_REDIS_PASSWORD_FILE` give the password apart from the URL, and win). Sentinels are
sent no credentials unless asked to, because a sentinel without a password refuses AUTH:
`sentinel_auth=same` sends them the servers' user and password (one password everywhere, the
common set-up), `sentinel_username` and `sentinel_password` give them their own. The other options
are those of a plain URL (`socket_timeout`, `socket_keepalive`, `ssl_ca_certs`, ...); anything
else is refused, naming the option.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis
from redis import connection as _connection
from redis import sentinel as _sentinel
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, SSLConnection
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from optuna_rq.errors import ConfigError
from optuna_rq.plumbing.locations import redact_url

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "SENTINEL_SCHEMES",
    "SentinelConnection",
    "SentinelSSLConnection",
    "SentinelUrl",
    "derived_sentinel_pool",
    "is_sentinel_url",
    "sentinel_client",
]

# redis-py's own, typed for mypy (they are not).
_parse_url: Callable[[str], dict[str, Any]] = _connection.parse_url
_Sentinel: Callable[..., Any] = _sentinel.Sentinel
_SentinelPool: Callable[..., SentinelConnectionPool] = _sentinel.SentinelConnectionPool

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""Each Sentinel scheme, and whether it speaks TLS."""
DEFAULT_SENTINEL_PORT = 26379

_FORM = "redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]"
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password", "sentinel_auth"}
_SSL_OPTIONS = {
    name for name in inspect.signature(SSLConnection.__init__).parameters if name.startswith("ssl_")
}
_NODE_OPTIONS = set(URL_QUERY_ARGUMENT_PARSERS) - {"db", "protocol", "retry_on_error"}
"""What a plain URL's query may set and a Sentinel URL's may too. Not `protocol` (the broker's
fenced client needs RESP2, the rest follow redis-py's default) nor `retry_on_error` (which errors
are retried is `connection.connect`'s to say)."""
_SENTINEL_SETTINGS = {"socket_connect_timeout", "socket_keepalive", "retry", "retry_on_error"}
_SENTINEL_SETTINGS |= _SSL_OPTIONS
"""The connection settings the sentinels share with the servers. Their reads are short answers,
never a blocking read, so they always get a socket timeout (`sentinel_client`)."""


class SentinelConnection(_sentinel.SentinelManagedConnection):
    """redis-py's connection to the primary Sentinel names, but one whose read was cut short (an
    exception raised by a signal handler in a blocking read: RQ's warm shutdown) is dropped, as a
    plain connection is. redis-py's keeps it, and its pool hands it out again with the cut
    command's reply still to come: the next command would wait behind a BLMOVE."""

    def read_response(
        self,
        disable_decoding: Any = False,
        *,
        disconnect_on_error: bool | None = True,
        **kwargs: Any,
    ) -> Any:
        return super().read_response(
            disable_decoding, disconnect_on_error=disconnect_on_error, **kwargs
        )


class SentinelSSLConnection(SentinelConnection, SSLConnection):
    """`SentinelConnection` over TLS."""


def is_sentinel_url(url: str) -> bool:
    """True if `url` names a Redis behind Sentinel (`redis+sentinel://`, `rediss+sentinel://`)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in SENTINEL_SCHEMES


@dataclass(frozen=True, kw_only=True)
class SentinelUrl:
    """A parsed Sentinel URL: the sentinels' addresses, the service, and the settings of the
    connections to the servers (`options`) and to the sentinels (`sentinel_options`)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    tls: bool
    options: dict[str, Any] = field(default_factory=dict)
    sentinel_options: dict[str, Any] = field(default_factory=dict)
    same_auth: bool = False
    """The sentinels get the servers' user and password (`sentinel_auth=same`)."""

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Parse `url`; ConfigError naming the part that is wrong and how to write it."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in SENTINEL_SCHEMES:
            raise _bad(url, f"it does not start with {' or '.join(_schemes())}")
        if "#" in rest:
            raise _bad(url, "it has a '#' fragment; percent-escape a '#' in the password as %23")
        rest, _, query = rest.partition("?")
        # The last "@" ends the user and password, as in `redact_url`: one with a "/" or "@" that
        # was not percent-escaped is still read as a whole, and never taken for a host.
        userinfo, at, located = rest.rpartition("@")
        hosts, _, path = located.partition("/")
        options: dict[str, Any] = {}
        if at:
            user, colon, password = userinfo.partition(":")
            if user:
                options["username"] = unquote(user)
            if colon and password:
                options["password"] = unquote(password)
        sentinels = tuple(_address(url, item) for item in hosts.split(","))
        service, db = _path(url, path)
        sentinel_options, same_auth, node_query = _query(url, query, tls=SENTINEL_SCHEMES[scheme])
        if db is not None:
            if "db" in node_query:
                raise _bad(url, "the db is given twice (after the service, and as ?db=); keep one")
            node_query["db"] = str(db)
        if node_query:  # typed exactly as redis-py types a plain URL's options
            try:
                options |= _parse_url(f"redis://localhost/?{urlencode(node_query)}")
            except ValueError as exc:
                raise _bad(url, f"{exc} Give it a value of its type") from None
            options.pop("host", None)
        if same_auth and sentinel_options:
            raise _bad(
                url,
                "sentinel_auth=same and sentinel_username/sentinel_password both say what the "
                "sentinels are sent; keep one",
            )
        return cls(
            sentinels=sentinels,
            service=service,
            tls=SENTINEL_SCHEMES[scheme],
            options=options,
            sentinel_options=sentinel_options,
            same_auth=same_auth,
        )


def _schemes() -> list[str]:
    return [f"{scheme}://" for scheme in SENTINEL_SCHEMES]


def _bad(url: str, why: str) -> ConfigError:

    return ConfigError(f"bad Sentinel URL {redact_url(url)!r}: {why}. The form is {_FORM}")


def _address(url: str, item: str) -> tuple[str, int]:
    """A sentinel's (host, port) from `host`, `host:port`, `[v6]` or `[v6]:port`."""
    if not item:
        raise _bad(url, "a sentinel's host is empty (two commas, or none before the '/')")
    if item.startswith("["):
        host, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise _bad(url, f"sentinel {item!r}: write an IPv6 address as [address]:port")
        port = port[1:]
    elif item.count(":") > 1:
        raise _bad(url, f"sentinel {item!r}: put an IPv6 address in brackets, [address]:port")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise _bad(url, f"sentinel {item!r} has no host")
    if not port:
        return unquote(host), DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(url, f"sentinel {item!r}: the port {port!r} is not a number from 1 to 65535")
    return unquote(host), int(port)


def _path(url: str, path: str) -> tuple[str, int | None]:
    """The service name and the db (None if not given) from `service[/db]`."""
    parts = path.split("/")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a trailing "/"
    service = unquote(parts[0])
    if not service:
        raise _bad(url, "no service name after the sentinels: the one `sentinel monitor` names")
    if len(parts) > 2:
        raise _bad(url, f"the path {'/' + path!r} has more than the service and a db")
    if len(parts) == 1:
        return service, None
    if not parts[1].isdigit():
        raise _bad(url, f"the db {parts[1]!r} after the service is not a number")
    return service, int(parts[1])


def _query(url: str, query: str, *, tls: bool) -> tuple[dict[str, Any], bool, dict[str, str]]:
    """(the sentinels' credentials, whether they get the servers', the servers' options)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad(url, "its query is not name=value pairs joined by '&'") from None
    seen: set[str] = set()
    sentinel: dict[str, Any] = {}
    same_auth = False
    node: dict[str, str] = {}
    for name, value in pairs:
        if name in seen:
            raise _bad(url, f"the option {name!r} is given twice; keep one")
        seen.add(name)
        if name == "sentinel_auth":
            if value != "same":
                raise _bad(
                    url,
                    f"sentinel_auth={value!r}: the one value is 'same' (the sentinels get the "
                    "servers' user and password); or give sentinel_username/sentinel_password",
                )
            same_auth = True
        elif name in _SENTINEL_OPTIONS:
            sentinel[name.removeprefix("sentinel_")] = value
        elif name in ("password", "username"):
            raise _bad(
                url,
                f"the option {name!r}: put the user and password before the sentinels "
                "(user:password@host...) or the password in OPTUNA_RQ_REDIS_PASSWORD",
            )
        elif name in _SSL_OPTIONS and not tls:
            raise _bad(url, f"the option {name!r} is for TLS: use rediss+sentinel://")
        elif name in _NODE_OPTIONS or name in _SSL_OPTIONS or name == "db":
            node[name] = value
        else:
            known = sorted(_NODE_OPTIONS | _SENTINEL_OPTIONS | ({"db"} | _SSL_OPTIONS))
            raise _bad(url, f"unknown option {name!r}; the options are {', '.join(known)}")
    return sentinel, same_auth, node


def sentinel_client(
    target: SentinelUrl, *, password: str | None, settings: Mapping[str, Any]
) -> redis.Redis:
    """A client of `target`'s primary: it asks the sentinels where that is whenever it opens a
    connection, and drops its idle ones when the answer changes. `settings` are the connection
    settings `connection.connect` gives every client (the URL's own options win, as in a plain
    URL); `password`, given apart from the URL, wins over the URL's. Lazy, as `connect` is."""
    node: dict[str, Any] = {**settings, **target.options}
    if password is not None:
        node["password"] = password
    node["connection_class"] = SentinelSSLConnection if target.tls else SentinelConnection
    to_sentinels: dict[str, Any] = {k: node[k] for k in _SENTINEL_SETTINGS if k in node}
    # A sentinel that stopped answering must not hold up the question: it is asked with the
    # connect timeout, once, and the next sentinel is asked (the servers' retries ask again).
    timeout_s = node.get("socket_connect_timeout")
    to_sentinels |= {"socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}
    if target.tls:
        to_sentinels["ssl"] = True
    if target.same_auth:
        to_sentinels |= {k: node[k] for k in ("username", "password") if node.get(k) is not None}
    to_sentinels |= target.sentinel_options
    manager = _Sentinel(list(target.sentinels), sentinel_kwargs=to_sentinels)
    client: redis.Redis = manager.master_for(target.service, **node)
    return client


def derived_sentinel_pool(
    pool: SentinelConnectionPool, settings: Mapping[str, Any], overrides: Mapping[str, Any]
) -> SentinelConnectionPool:
    """A new pool for the primary `pool` serves, its connections made with `settings` (`pool`'s
    own, with `overrides`). The overrides the sentinels share, `socket_timeout` included, apply
    to the sentinels too."""
    manager = pool.sentinel_manager
    to_sentinels = dict(manager.sentinel_kwargs)
    to_sentinels |= {k: v for k, v in overrides.items() if k in _SENTINEL_SETTINGS}
    if "socket_timeout" in overrides:
        to_sentinels["socket_timeout"] = overrides["socket_timeout"]
    addresses = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in manager.sentinels
    ]
    new_manager = _Sentinel(
        addresses, sentinel_kwargs=to_sentinels, min_other_sentinels=manager.min_other_sentinels
    )
    return _SentinelPool(
        pool.service_name,
        new_manager,
        connection_class=pool.connection_class,
        is_master=pool.is_master,
        check_connection=pool.check_connection,
        max_connections=pool.max_connections,
        **settings,
    )
