"""A study resumes only in the storage it ran in.

A broker that re-attaches a study (restarted, or a standby taking over) opens the study's storage
by its URL: the study's own (`submit --storage`), or for one that named none, the broker's
default. Optuna creates a study it does not find, so a storage that is not the one the study ran
in would silently start it afresh, its trials elsewhere. Two ways that happens:

- the study ran on the default storage of another broker (the journal file in that broker's own
  state directory, say), and this broker's default is another one: `moved_default`;
- the URL is the same, but it does not reach the same data (a journal path on a disk the brokers
  do not share, a storage that was wiped): the storage holds no such study although its last
  status counts trials told there (`missing_study`; a status is published only once what it
  counts is durable in the storage).

Either way the study is not resumed: it ends FAILED, saying why and what to do. A standby says
so while it stands by (`not_resumable`), so that a storage it would not share shows when it is
deployed, not when it takes over.
"""

from __future__ import annotations

from typing import Any

import redis
from optuna.storages import BaseStorage

from optuna_rq.errors import ProtocolError
from optuna_rq.plumbing.locations import redact_url
from optuna_rq.protocol import Keys, Signer, StudySpec, StudyStatus, open_stored_spec
from optuna_rq.protocol.status import read_status
from optuna_rq.storage.storage_policy import UncheckableURLError, canonical_storage

__all__ = ["missing_study", "moved_default", "not_resumable"]

_SHARE = (
    "Brokers that take over from one another (a restart elsewhere, a --standby) must reach the "
    "same study storage: start every one with the same --storage (PostgreSQL, or a journal "
    "file path they all reach), then submit the study again to run it on in its storage "
    "(`optuna-rq submit ... --study-name {name}`)"
)


def _canonical(url: str) -> str:
    try:
        return canonical_storage(url)
    except UncheckableURLError:
        return url


def moved_default(spec: StudySpec, ran: StudyStatus | None, default: str) -> str | None:
    """Why `spec`'s study may not resume on this broker's `default` storage (None: it may): it
    names no storage of its own, and its last status (`ran`) says it ran on another one."""
    if spec.storage is not None or ran is None or not ran.storage:
        return None
    if _canonical(ran.storage) == _canonical(default):
        return None
    return (
        f"study {spec.name!r} is not resumed: it ran on {redact_url(ran.storage)}, the default "
        "storage of the broker that served it, and this broker's default storage is "
        f"{redact_url(default)}, where it would start afresh. " + _SHARE.format(name=spec.name)
    )


def missing_study(
    spec: StudySpec, ran: StudyStatus | None, storage: BaseStorage, url: str
) -> str | None:
    """Why `spec`'s study may not resume in `storage` (at `url`; None: it may): the storage
    holds no such study, and its last status (`ran`) counts trials told there."""
    told = 0 if ran is None else ran.complete + ran.pruned + ran.failed + ran.running
    if not told:
        return None
    try:
        storage.get_study_id_from_name(spec.name)
    except KeyError:
        return (
            f"study {spec.name!r} is not resumed: its storage {redact_url(url)} holds no such "
            f"study, yet it ran {told} trials there; this broker does not reach the storage it "
            "ran in (a journal file on a disk the brokers do not share?), or it was wiped. "
            + _SHARE.format(name=spec.name)
        )
    return None


def not_resumable(connection: redis.Redis, keys: Keys, signer: Signer, default: str) -> list[str]:
    """Why each stored study that has not ended would not resume on a broker whose default
    storage is `default` (`moved_default`), read without writing anything: what a standby says
    while it stands by. A spec or status that does not open is left to the broker that takes
    over (it refuses it, and counts it)."""
    stored: dict[Any, Any] = connection.hgetall(keys.studies)
    reasons = []
    for key, raw in sorted(stored.items()):
        name = bytes(key).decode(errors="replace")
        try:
            spec = open_stored_spec(signer, name, raw)
            ran = read_status(connection, keys, signer, name)
        except ProtocolError:
            continue
        if ran is None or ran.state.ended:
            continue
        why = moved_default(spec, ran, default)
        if why is not None:
            reasons.append(why)
    return reasons
