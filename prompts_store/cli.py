"""``lpt store``: list, inspect, export and import a prompt store (backups; embedded <-> Redis migration), show a
tenant's usage and apply retention (``gc``).

Registered through the ``lpt.commands`` entry point, so ``lpt`` never imports this package itself.

Export archive (plain tar)::

    blobs/<sha256>     the bytes of every distinct version, once
    manifest.json      {"format": "lpt-store-export/1", "created": ..., "tasks": [
                         {"tenant", "task", "active", "versions": [{"version", "sha256", "size", "created", "meta"}]}]}

Import checks everything (format, ids, every blob's sha256 and size, version conflicts with the target) before
it writes anything, then recreates each version with its original number and time, then sets each active pointer.
Re-importing the same archive is a no-op. Revisions are not exported: every write of an import gives its task a
fresh revision from the target's clock, above any revision the tasks had before a wipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from lpt.errors import LptError, NotFound, VersionConflict
from lpt.ids import check_task_id, check_tenant_id
from lpt.prompt_set import MAX_PROMPT_BYTES
from prompts_store.base import PromptStore, SupportsMaintenance, SupportsRestore
from prompts_store.factory import open_store

FORMAT = "lpt-store-export/1"
MANIFEST = "manifest.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``store`` and its sub-commands to the ``lpt`` parser.

    Args:
        subparsers: the ``lpt`` parser's sub-parsers; each leaf sets ``func(args) -> int``.
    """
    store = subparsers.add_parser("store", help="list, inspect, export, import and gc a prompt store")
    sub = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")

    def leaf(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--store", required=True, help="a Redis URL (docs/store.md), or an embedded store path")
        p.add_argument("--timeout", type=float, default=5.0, help="Redis socket timeout in seconds (default 5)")
        p.add_argument("--max-bytes", type=int, default=MAX_PROMPT_BYTES, help="largest prompt set accepted")
        return p

    p = leaf("list", "list tenants and tasks with their active versions")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = leaf("inspect", "show every version of one task")
    p.add_argument("--tenant", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = leaf("get", "write the bytes of one version (active by default) to a file")
    p.add_argument("--tenant", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_get)

    p = leaf("export", "write every version and active pointer to a tar archive")
    p.add_argument("--out", required=True, type=Path, help="archive to write (replaced atomically)")
    p.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    p.set_defaults(func=cmd_export)

    p = leaf("import", "recreate the versions and active pointers of an archive in this store")
    p.add_argument("archive", type=Path)
    p.add_argument("--dry-run", action="store_true", help="verify the archive and the target, write nothing")
    p.set_defaults(func=cmd_import)

    p = leaf("usage", "show what each tenant stores, as the quotas count it")
    p.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_usage)

    p = leaf("gc", "apply retention: delete all inactive versions of every task but the newest N")
    p.add_argument(
        "--keep-inactive-versions",
        type=int,
        required=True,
        metavar="N",
        help="inactive versions each task keeps; the active version and the one active before it are never deleted",
    )
    p.set_defaults(func=cmd_gc)


def _run(args: argparse.Namespace, body: Any) -> int:
    try:
        store = open_store(args.store, max_bytes=args.max_bytes, timeout_s=args.timeout)
    except (LptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return body(store)
    except (LptError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _info_dict(v: Any) -> dict[str, Any]:
    return {"version": v.version, "sha256": v.sha256, "size": v.size, "created": v.created, "meta": v.meta}


def cmd_list(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        snap = store.snapshot()
        tenants = [check_tenant_id(args.tenant)] if args.tenant else store.list_tenants()
        rows = [
            {"tenant": t, "task": k, "active": snap[(t, k)].active if (t, k) in snap else None}
            for t in tenants
            for k in store.list_tasks(t)
        ]
        return _print_rows(args, rows, "{tenant}\t{task}\tv{active}")

    return _run(args, body)


def _print_rows(args: argparse.Namespace, rows: list[dict[str, Any]], line: str) -> int:
    """Print ``rows`` as JSON with ``--json``, else one ``line.format(**row)`` each; the command's exit status."""
    for text in [json.dumps(rows, indent=2)] if args.json else [line.format(**r) for r in rows]:
        print(text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        current = store.active_version(args.tenant, args.task)
        active = current.version
        versions = store.list_versions(args.tenant, args.task)
        if args.json:
            out = {"tenant": args.tenant, "task": args.task, "active": active, "revision": current.revision}
            print(json.dumps(out | {"versions": [_info_dict(v) for v in versions]}, indent=2))
            return 0
        for v in versions:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created))
            mark = "*" if v.version == active else " "
            print(f"{mark} v{v.version}\t{v.size}\t{v.sha256}\t{when}\t{json.dumps(v.meta)}")
        return 0

    return _run(args, body)


def cmd_get(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        blob = store.get(args.tenant, args.task, args.version)
        args.out.write_bytes(blob.data)
        print(f"v{blob.info.version} {blob.info.sha256} -> {args.out}")
        return 0

    return _run(args, body)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), int(mtime), 0o600
    tar.addfile(ti, io.BytesIO(data))


def cmd_export(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        tenants = [check_tenant_id(t) for t in args.tenant] if args.tenant else store.list_tenants()
        tmp = args.out.with_name(args.out.name + ".partial")
        tasks, written, n_versions = [], set(), 0
        with tarfile.open(tmp, "w") as tar:
            for tenant in tenants:
                for task in store.list_tasks(tenant):
                    # Pointer first: versions are immutable and only added, so the active one is in the list.
                    try:
                        active = store.active_version(tenant, task).version
                        versions = store.list_versions(tenant, task)
                        for v in versions:  # one blob in memory at a time
                            if v.sha256 not in written:
                                _add_bytes(tar, f"blobs/{v.sha256}", store.get(tenant, task, v.version).data, v.created)
                                written.add(v.sha256)
                    except NotFound:  # an unlisted blob left behind in the archive is ignored by import
                        print(f"warning: {tenant}/{task} was deleted during the export; skipped", file=sys.stderr)
                        continue
                    entry = {"tenant": tenant, "task": task, "active": active}
                    tasks.append(entry | {"versions": [_info_dict(v) for v in versions]})
                    n_versions += len(versions)
            manifest = {"format": FORMAT, "created": time.time(), "source": repr(store), "tasks": tasks}
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1).encode(), time.time())
        os.replace(tmp, args.out)
        print(f"exported {len(tasks)} tasks, {n_versions} versions, {len(written)} blobs to {args.out}")
        return 0

    return _run(args, body)


def _read_manifest(tar: tarfile.TarFile) -> list[dict[str, Any]]:
    """The manifest's tasks, every field checked (ids, numbers, an active version that exists)."""
    try:
        manifest = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
    except (KeyError, AttributeError, ValueError) as e:
        raise LptError("invalid_archive", f"no readable {MANIFEST}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LptError("invalid_archive", f"not an {FORMAT} archive")
    try:
        return [_check_task(t) for t in manifest["tasks"]]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise LptError("invalid_archive", f"malformed {MANIFEST}: {e!r}") from e


def _check_task(t: dict[str, Any]) -> dict[str, Any]:
    name = f"{check_tenant_id(t['tenant'])}/{check_task_id(t['task'])}"
    numbers = [v["version"] for v in t["versions"]]
    if not all(isinstance(n, int) and n >= 1 for n in numbers) or len(set(numbers)) != len(numbers):
        raise LptError("invalid_archive", f"{name}: bad version numbers {numbers}")
    if t["active"] not in numbers:
        raise LptError("invalid_archive", f"{name}: active v{t['active']} is not in the archive")
    for v in t["versions"]:
        if not (isinstance(v["sha256"], str) and isinstance(v["size"], int) and isinstance(v["meta"], dict)):
            raise LptError("invalid_archive", f"{name}: malformed version {v!r}")
        v["created"] = float(v["created"])
    t["versions"].sort(key=lambda v: v["version"])
    return t


def _blob(tar: tarfile.TarFile, sha: str, size: int, max_bytes: int) -> bytes:
    """The blob's bytes, checked against the manifest's sha256 and size (and the store's limit before reading)."""
    try:
        member = tar.getmember(f"blobs/{sha}")
    except KeyError as e:
        raise LptError("invalid_archive", f"blob {sha} is missing") from e
    if member.size > max_bytes:
        raise LptError("too_large", f"blob {sha} is {member.size} bytes; the store accepts {max_bytes}")
    data = tar.extractfile(member).read()  # type: ignore[union-attr]
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
        raise LptError("invalid_archive", f"blob {sha} fails its sha256/size check: the archive is corrupt")
    return data


def cmd_import(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        if not isinstance(store, SupportsRestore):
            raise LptError("unsupported", f"{store!r} cannot restore versions")
        with tarfile.open(args.archive, "r:") as tar:
            tasks = _read_manifest(tar)
            sizes = {v["sha256"]: v["size"] for t in tasks for v in t["versions"]}
            for sha, size in sizes.items():  # verify every byte before writing any
                _blob(tar, sha, size, store.max_bytes)
            for t in tasks:  # refuse to overwrite a different history
                try:
                    have = {v.version: v.sha256 for v in store.list_versions(t["tenant"], t["task"])}
                except LptError as e:
                    if e.code != "not_found":
                        raise
                    have = {}
                for v in t["versions"]:
                    if have.get(v["version"], v["sha256"]) != v["sha256"]:
                        raise VersionConflict(
                            "version_conflict",
                            f"{t['tenant']}/{t['task']} v{v['version']} exists in the target with other bytes",
                        )
            n = sum(len(t["versions"]) for t in tasks)
            if args.dry_run:
                print(f"ok: {len(tasks)} tasks, {n} versions verified; nothing written (dry run)")
                return 0
            for t in tasks:
                for v in t["versions"]:
                    data = _blob(tar, v["sha256"], v["size"], store.max_bytes)
                    store.restore_version(t["tenant"], t["task"], v["version"], data, v["created"], v["meta"])
                store.activate(t["tenant"], t["task"], t["active"])
        print(f"imported {len(tasks)} tasks, {n} versions from {args.archive}")
        return 0

    return _run(args, body)


def _maintenance(store: PromptStore) -> SupportsMaintenance:
    if not isinstance(store, SupportsMaintenance):
        raise LptError("unsupported", f"{store!r} has no usage counters or retention")
    return store


def cmd_usage(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        tenants = [check_tenant_id(t) for t in args.tenant] if args.tenant else store.list_tenants()
        rows = [{"tenant": t} | dataclasses.asdict(_maintenance(store).usage(t)) for t in tenants]
        return _print_rows(args, rows, "{tenant}\t{tasks} tasks\t{bytes} bytes")

    return _run(args, body)


def cmd_gc(args: argparse.Namespace) -> int:
    def body(store: PromptStore) -> int:
        if args.keep_inactive_versions < 0:
            raise LptError("invalid_argument", "--keep-inactive-versions must be >= 0")
        report = _maintenance(store).gc(args.keep_inactive_versions)
        print(
            f"deleted {report.versions_deleted} versions of {report.tasks_pruned} tasks, "
            f"{report.bytes_freed} bytes freed (kept {args.keep_inactive_versions} inactive versions per task)"
        )
        return 0

    return _run(args, body)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m prompts_store.cli store ...``) for when the ``lpt`` CLI is not installed."""
    parser = argparse.ArgumentParser(prog="lpt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
