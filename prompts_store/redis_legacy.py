"""The layout the Redis store wrote before hash tags, moved into the current one in place, once per store.

That layout (``p`` the prefix), on one server or a Sentinel primary (writes never worked on a Cluster)::

    {p}tenants                        SET    tenants with at least one task (the current registry keeps the name)
    {p}tasks:{tenant}                 SET    task ids of a tenant
    {p}task:{tenant}:{task}           HASH   active -> N; v:N -> JSON {sha256, size, created, meta}
    {p}blob:{tenant}:{task}:{sha256}  STRING the bytes
    {p}blobs:{tenant}:{task}          SET    sha256 of the task's blobs
    {p}seq:{tenant}:{task}            STRING the last version number issued (kept after a delete)
    {p}active                         HASH   "{tenant}/{task}" -> JSON {revision, active, sha256}, or a bare N
                                             (written before revisions: revision 0)

Each task moves in one transaction that WATCHes its old keys, so several processes opening the store at once
move it exactly once; revisions, tombstones and version numbers are kept. ``{p}layout`` marks a store that
holds no old keys, so later opens read one key. Stop every writer of the old layout before a new one starts.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import redis

LAYOUT = b"hash-tags/1"


class Layout(Protocol):
    """The key names of the current layout (the Redis store), and its recount of a tenant's counters."""

    prefix: str
    tenants_key: str

    def task_key(self, tenant: str, task: str) -> str: ...

    def blob_key(self, tenant: str, task: str, sha: str) -> str: ...

    def tasks_key(self, tenant: str) -> str: ...

    def _recount_tenant(self, tenant: str) -> Any: ...


def migrate_legacy_layout(store: Layout, client: redis.Redis) -> None:
    """Move every task of the old layout (if any) into the current one and count the tenants' usage.

    Args:
        store: the store whose key names are the target.
        client: a client of the server or Sentinel primary.
    """
    p = store.prefix
    marker = f"{p}layout"
    if client.get(marker) == LAYOUT:
        return
    tasks = {tuple(f.decode().split("/", 1)) for f in client.hkeys(f"{p}active")}
    for pattern in (f"{p}seq:*", f"{p}task:*"):
        for key in client.scan_iter(match=pattern, count=1000):
            tenant, _, task = key.decode()[len(pattern) - 1 :].partition(":")
            if tenant and task:
                tasks.add((tenant, task))
    for tenant, task in sorted(tasks):
        _move_task(store, client, tenant, task)
    for tenant in {tenant for tenant, _ in tasks}:
        store._recount_tenant(tenant)
    for key in client.scan_iter(match=f"{p}tasks:*", count=1000):
        client.delete(key)
    client.set(marker, LAYOUT)


def _move_task(store: Layout, client: redis.Redis, tenant: str, task: str) -> None:
    p = store.prefix
    old_task, old_seq, old_blobs, states = (
        f"{p}task:{tenant}:{task}",
        f"{p}seq:{tenant}:{task}",
        f"{p}blobs:{tenant}:{task}",
        f"{p}active",
    )
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(old_task, old_seq, old_blobs, states)
                fields: dict[bytes, bytes] = pipe.hgetall(old_task)
                seq, shas, entry = pipe.get(old_seq), pipe.smembers(old_blobs), pipe.hget(states, f"{tenant}/{task}")
                if not fields and seq is None and not shas and entry is None:
                    return  # moved by another process
                versions = {int(k[2:]): v for k, v in fields.items() if k.startswith(b"v:")}
                state = _old_state(entry, fields, versions)
                referenced = {json.loads(v)["sha256"] for v in versions.values()}
                present = [sha for sha in referenced if pipe.exists(f"{p}blob:{tenant}:{task}:{sha}")]
                last = max([int(seq or 0), *versions])
                new_fields: dict[str, Any] = {f"v:{n}": v for n, v in versions.items()}
                new_fields["state"] = json.dumps({**state, "previous": None, "last": last})
                pipe.multi()
                pipe.hset(store.task_key(tenant, task), mapping=new_fields)
                for sha in present:
                    pipe.rename(f"{p}blob:{tenant}:{task}:{sha}", store.blob_key(tenant, task, sha))
                orphans = [f"{p}blob:{tenant}:{task}:{s.decode()}" for s in shas if s.decode() not in referenced]
                pipe.delete(old_task, old_seq, old_blobs, *orphans)
                pipe.hdel(states, f"{tenant}/{task}")
                pipe.sadd(store.tasks_key(tenant), task)
                pipe.sadd(store.tenants_key, tenant)
                pipe.execute()
                return
            except redis.WatchError:
                continue


def _old_state(entry: bytes | None, fields: dict[bytes, bytes], versions: dict[int, bytes]) -> dict[str, Any]:
    """{revision, active, sha256} of a task in the old layout: its ``{p}active`` entry (JSON, a bare number
    written before revisions, or none) and the ``active`` field of its hash."""
    d = json.loads(entry) if entry is not None else None
    if isinstance(d, dict):
        revision, active = int(d["revision"]), d["active"]
    else:
        revision = 0
        active = d if isinstance(d, int) else int(fields[b"active"]) if b"active" in fields else None
    if active not in versions:
        active = None  # a tombstone, or a pointer to a version that is gone: nothing to serve
    sha = json.loads(versions[active])["sha256"] if active is not None else None
    return {"revision": revision, "active": active, "sha256": sha}
