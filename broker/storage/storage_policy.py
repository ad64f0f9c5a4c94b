"""Which study storages the broker opens: its operator decides, never the wire.

A study's storage URL comes from its submission (`submit --storage`), and anyone who can write
to Redis can forge a submission when signing is off (or plant a spec the broker re-attaches).
So the broker opens a study's storage only if its own configuration allows it: its default
storage (`broker --storage`, or the journal in its state directory), or a URL one of its
`broker --allow-storage PATTERN` options matches. Anything else is refused, at submit and at
re-attach, with the line `StoragePolicy.refusal` gives. `StoragePolicy` is the one owner of
that rule; the broker's storages (`guarded_storages.Storages`) check it before they open one.

What is matched is the URL in a canonical form, the one its opener acts on:

- `journal:///path`: "journal://" and the path resolved (`os.path.realpath`: symlinks, "." and
  ".." resolved, a relative path taken from the broker's working directory), so that
  `journal:///data/../etc/x` is matched as `journal:///etc/x`;
- `sqlite:///path` (and `sqlite+driver:///path`): "sqlite:///" and the path resolved the same
  way, then its query string, if any;
- any other database URL (postgresql://, mysql://, ...): as SQLAlchemy reads it, without the
  user name and password: `scheme://host[:port]/database[?query]`;
- `redis://` and `rediss://` (Optuna's JournalRedis): as redis-py reads it, without the user
  name and password: `scheme://host[:port]/path[?query]`;
- `memory` is `memory`.

A pattern is matched against the whole canonical URL, case-sensitively. `*` matches any run of
characters but "/" and "?" (one path segment, one database name); `**` matches any run of
characters at all (subdirectories, and any query string: `postgresql://db/**` lets a submission
add `?host=elsewhere`, which libpq obeys); every other character is literal ("?", "[" and "]"
included: URLs are full of them). A pattern that contains "/" and no "://" is a path of journal
files (`/data/*.journal` is `journal:///data/*.journal`). The directories a journal or sqlite
pattern names before its first wildcard are resolved like a URL's path (so a pattern through a
symlinked directory still matches), and "." or ".." after a wildcard is refused.

JournalRedis unpickles a snapshot key when it loads, so whoever can write to that Redis runs code
in whatever opens it. A `redis://` or `rediss://` URL is allowed only by a pattern that starts
with that scheme, literally (`redis://cache.internal:6379/*`): `*`, `**` or any other pattern
never allows it. The default storage is allowed whatever it is: the operator named it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from optuna_rq.errors import ConfigError, StorageNotAllowedError
from optuna_rq.plumbing.locations import redact_url
from optuna_rq.storage.storage_access import journal_path

__all__ = ["ALLOW_STORAGE_OPTION", "PICKLING_SCHEMES", "StoragePolicy", "canonical_storage"]

ALLOW_STORAGE_OPTION = "--allow-storage"
PICKLING_SCHEMES = ("redis", "rediss")
"""URL schemes of Optuna's JournalRedis, which unpickles what it loads."""


class UncheckableURLError(ValueError):
    """A URL with no canonical form: none of the broker's storages would open it either."""


def canonical_storage(url: str) -> str:
    """`url` as the storage policy matches it (see the module); UncheckableURLError if it has no
    canonical form (a port that is not a number, a URL SQLAlchemy cannot parse)."""
    if url == "memory":
        return url
    path = journal_path(url)
    if path is not None:
        return f"journal://{os.path.realpath(path)}"
    scheme = url.partition("://")[0]
    if scheme in PICKLING_SCHEMES:
        return _canonical_redis(url)
    return _canonical_database(url)


def _canonical_redis(url: str) -> str:
    # Read as redis-py's `parse_url` reads it: the host (unquoted), the port, the path; the
    # query may set the host or db itself, so it is part of what is matched.
    try:
        parts = urllib.parse.urlparse(url)
        port = parts.port
    except ValueError as exc:
        raise UncheckableURLError(str(exc)) from None
    host = urllib.parse.unquote(parts.hostname or "")
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def _canonical_database(url: str) -> str:
    # Read as SQLAlchemy's `make_url` reads it, which is what `create_engine` connects to: a
    # textual split could see another host than the driver (a "/" or "@" in a password).
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise UncheckableURLError(str(exc)) from None
    query = "&".join(
        f"{key}={value}"
        for key, values in parsed.query.items()
        for value in (values if isinstance(values, tuple) else (values,))
    )
    query = f"?{query}" if query else ""
    scheme = parsed.drivername
    if scheme == "sqlite" or scheme.startswith("sqlite+"):
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            database = os.path.realpath(database)
        return f"{scheme}:///{database}{query}"
    host = parsed.host or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parsed.port is None else f"{host}:{parsed.port}"
    database = "" if parsed.database is None else f"/{parsed.database}"
    return f"{scheme}://{netloc}{database}{query}"


@dataclass(frozen=True)
class _Pattern:
    text: str  # as the operator wrote it
    regex: re.Pattern[str]
    pickling: bool  # names a JournalRedis scheme, literally: may allow one

    def matches(self, canonical: str) -> bool:
        if canonical.partition("://")[0] in PICKLING_SCHEMES and not self.pickling:
            return False
        return self.regex.fullmatch(canonical) is not None


def _compile(pattern: str) -> _Pattern:
    text = pattern
    if "://" not in pattern and "/" in pattern:
        pattern = f"journal://{pattern}"
    scheme, sep, rest = pattern.partition("://")
    if sep and (scheme == "journal" or scheme == "sqlite" or scheme.startswith("sqlite+")):
        prefix = "journal://" if scheme == "journal" else f"{scheme}:///"
        if scheme != "journal":
            rest = rest.removeprefix("/")  # sqlite:///rel, sqlite:////abs: the path after "///"
        path, qmark, query = rest.partition("?")
        if not path:
            raise ConfigError(f"{ALLOW_STORAGE_OPTION} {text!r}: it names no file")
        pattern = f"{prefix}{_resolved_path_pattern(path, text)}{qmark}{query}"
    elif sep and "@" in rest.partition("/")[0]:
        raise ConfigError(
            f"{ALLOW_STORAGE_OPTION} {redact_url(text)!r}: user names and passwords are not "
            "matched (a study's URL is matched without them): leave them out of the pattern"
        )
    pieces = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        ".*" if piece == "**" else "[^/?]*" if piece == "*" else re.escape(piece)
        for piece in pieces
    )
    pickling = sep != "" and scheme in PICKLING_SCHEMES
    return _Pattern(text=text, regex=re.compile(regex, re.DOTALL), pickling=pickling)


def _resolved_path_pattern(path: str, text: str) -> str:
    """`path` (a file pattern) with the directories before its first wildcard resolved as a
    URL's path is, so that both sides are compared resolved."""
    segments = path.split("/")
    wild = next((i for i, s in enumerate(segments) if "*" in s), len(segments))
    if any(s in (".", "..") for s in segments[wild:]):
        raise ConfigError(
            f"{ALLOW_STORAGE_OPTION} {text!r}: '.' or '..' after a wildcard would be matched "
            "literally (paths are resolved before they are matched); write the directory out"
        )
    if wild == len(segments):
        return os.path.realpath(path)
    if wild == 0:  # a relative pattern starting with a wildcard: from the working directory
        literal = "."
    else:
        literal = "/".join(segments[:wild]) or "/"
    resolved = os.path.realpath(literal)
    return "/".join([resolved.rstrip("/"), *segments[wild:]])


class StoragePolicy:
    """The storages a broker opens: `default` (its own, allowed whatever it is) and the URLs an
    `allowed` pattern matches (see the module)."""

    def __init__(self, default: str, allowed: Iterable[str] = ()) -> None:
        self.default = default
        self.patterns = tuple(_compile(p) for p in allowed)
        try:
            self._default = canonical_storage(default)
        except UncheckableURLError:
            self._default = default

    def refusal(self, url: str) -> str | None:
        """None if the broker may open the storage at `url`; else why not, in one line that
        names the URL (password redacted) and the option that would allow it."""
        if url == self.default:
            return None
        shown = redact_url(url)
        try:
            canonical = canonical_storage(url)
        except UncheckableURLError as exc:
            return (
                f"storage {shown!r} is not allowed on this broker: it is not a storage URL the "
                f"broker can check against its {ALLOW_STORAGE_OPTION} patterns ({exc})"
            )
        if canonical == self._default or any(p.matches(canonical) for p in self.patterns):
            return None
        suggested = redact_url(canonical)
        if canonical.partition("://")[0] in PICKLING_SCHEMES:
            return (
                f"storage {shown!r} is not allowed on this broker: it is Optuna's JournalRedis, "
                "which unpickles what it loads (whoever can write to that Redis would run code "
                "in the broker); the broker opens one only if its operator allows it with an "
                f"{ALLOW_STORAGE_OPTION} pattern that starts with "
                f"'{canonical.partition('://')[0]}://' (e.g. {ALLOW_STORAGE_OPTION} "
                f"'{suggested}')"
            )
        return (
            f"storage {shown!r} is not allowed on this broker: it opens only its default "
            f"storage and what its {ALLOW_STORAGE_OPTION} patterns match (its operator allows "
            f"this one with: optuna-rq broker {ALLOW_STORAGE_OPTION} '{suggested}')"
        )

    def allows(self, url: str) -> bool:
        return self.refusal(url) is None

    def check(self, url: str) -> None:
        """StorageNotAllowedError (a ConfigError) unless the broker may open `url`."""
        why = self.refusal(url)
        if why is not None:
            raise StorageNotAllowedError(why)
