"""``lpt store`` export/import: migrate embedded SQLite <-> a real redis-server without losing history."""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from prompts_store import PromptStore, open_store
from prompts_store.cli import register


def lpt(*argv: str) -> int:
    """Run ``lpt store ...`` the way lpt/cli.py does: a parser whose sub-commands come from ``register``."""
    parser = argparse.ArgumentParser(prog="lpt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", *argv])
    return args.func(args)


def history(store: PromptStore) -> dict:
    """Everything an export must carry: per task, the active pointer and every version (bytes included)."""
    out = {}
    for tenant in store.list_tenants():
        for task in store.list_tasks(tenant):
            versions = store.list_versions(tenant, task)
            out[(tenant, task)] = (
                store.active_version(tenant, task).version,
                [(v, store.get(tenant, task, v.version).data) for v in versions],
            )
    return out


def states(store: PromptStore) -> dict:
    """Every task's active version and sha256 (tombstones too), without the revision."""
    return {key: (s.active, s.sha256) for key, s in store.snapshot().items()}


def fill(store: PromptStore) -> None:
    store.put("acme", "birds", os.urandom(300), {"num_classes": "10"})
    store.put("acme", "birds", os.urandom(300))
    store.activate("acme", "birds", 1)  # active is not the latest
    store.put("acme", "cars", os.urandom(100))
    store.delete("acme", "cars")
    store.put("acme", "cars", os.urandom(100))  # recreated: starts at v2 (numbers are never reused)
    store.put("globex", "birds", os.urandom(50))


def test_export_sqlite_import_redis_round_trip(tmp_path, redis_server, capsys):
    src_spec, archive = str(tmp_path / "embedded"), tmp_path / "backup.tar"
    src = open_store(src_spec)
    fill(src)
    want = history(src)
    assert want[("acme", "cars")][1][0][0].version == 2

    assert lpt("export", "--store", src_spec, "--out", str(archive)) == 0
    assert lpt("import", "--store", redis_server.url, str(archive)) == 0
    dst = open_store(redis_server.url)
    assert history(dst) == want  # numbers, sha256, sizes, created times, meta, bytes, active pointers
    live_src = {key: state for key, state in states(src).items() if state[0] is not None}
    assert states(dst) == live_src  # an export holds no tombstones
    # Revisions are not copied: the import's writes take fresh ones, later than every write of the source.
    assert min(s.revision for s in dst.snapshot().values()) > max(s.revision for s in src.snapshot().values())
    assert dst.put("acme", "birds", os.urandom(10)).version == 3  # numbering continues after the import
    before = dst.snapshot()
    assert lpt("import", "--store", redis_server.url, str(archive)) == 0  # re-import: a no-op
    after = dst.active_version("acme", "birds")
    assert after.version == 1  # ...that re-applies the archive's pointer, a change with its own revision
    assert after.revision > before[("acme", "birds")].revision
    assert dst.snapshot()[("acme", "cars")] == before[("acme", "cars")]  # unchanged: nothing written

    # And back: Redis -> a fresh embedded store.
    back_spec = str(tmp_path / "back")
    assert lpt("export", "--store", redis_server.url, "--out", str(tmp_path / "b.tar"), "--tenant", "acme") == 0
    assert lpt("import", "--store", back_spec, str(tmp_path / "b.tar")) == 0
    back = open_store(back_spec)
    assert back.list_tenants() == ["acme"]
    assert [v.version for v in back.list_versions("acme", "birds")] == [1, 2, 3]

    capsys.readouterr()
    assert lpt("list", "--store", back_spec, "--json") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"tenant": "acme", "task": "birds", "active": 1},
        {"tenant": "acme", "task": "cars", "active": 2},
    ]
    assert lpt("inspect", "--store", back_spec, "--tenant", "acme", "--task", "birds") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("* v1") and '"num_classes": "10"' in lines[0]
    assert lpt("inspect", "--store", back_spec, "--tenant", "acme", "--task", "birds", "--json") == 0
    inspected = json.loads(capsys.readouterr().out)
    assert (inspected["active"], inspected["revision"]) == (1, back.state("acme", "birds").revision)
    out = tmp_path / "v2.bin"
    argv = ["--tenant", "acme", "--task", "birds", "--version", "2", "--out", str(out)]
    assert lpt("get", "--store", back_spec, *argv) == 0
    assert out.read_bytes() == want[("acme", "birds")][1][1][1]
    for s in (src, dst, back):
        s.close()


def _rewrite(archive: Path, edit) -> Path:
    """A copy of ``archive`` with each member's bytes passed through ``edit(name, data)``."""
    bad = archive.with_name("bad.tar")
    with tarfile.open(archive) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = edit(m.name, src.extractfile(m).read())
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return bad


def test_import_verifies_everything_before_writing(tmp_path, capsys):
    src_spec, archive = str(tmp_path / "src"), tmp_path / "backup.tar"
    src = open_store(src_spec)
    fill(src)
    assert lpt("export", "--store", src_spec, "--out", str(archive)) == 0

    def flip_last_blob_byte(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name.startswith("blobs/") else data

    def bad_active(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        m = json.loads(data)
        m["tasks"][-1]["active"] = 99
        return json.dumps(m).encode()

    target = str(tmp_path / "target")
    for edit in (flip_last_blob_byte, bad_active):
        assert lpt("import", "--store", target, str(_rewrite(archive, edit))) == 1
        assert "invalid_archive" in capsys.readouterr().err
        assert open_store(target).list_tenants() == []  # nothing written

    # A target with a different history for the same task and version is refused, untouched.
    other = open_store(target)
    other.put("acme", "birds", b"not the same bytes")
    assert lpt("import", "--store", target, str(archive)) == 1
    assert "version_conflict" in capsys.readouterr().err
    assert other.list_tasks("acme") == ["birds"] and len(other.list_versions("acme", "birds")) == 1

    assert lpt("import", "--store", str(tmp_path / "dry"), "--dry-run", str(archive)) == 0
    assert open_store(str(tmp_path / "dry")).list_tenants() == []
    # Import respects the target's size limit before reading a blob.
    assert lpt("import", "--store", str(tmp_path / "small"), "--max-bytes", "100", str(archive)) == 1
    assert "too_large" in capsys.readouterr().err


def test_unreachable_store_is_a_clean_error(capsys):
    t0 = time.monotonic()
    assert lpt("list", "--store", "redis://127.0.0.1:1/0", "--timeout", "0.3") == 1
    assert "store_unavailable" in capsys.readouterr().err and time.monotonic() - t0 < 2


@pytest.mark.parametrize("argv", [["inspect", "--tenant", "acme", "--task", "../x"], ["list", "--tenant", "Bad"]])
def test_invalid_ids_are_clean_errors(tmp_path, capsys, argv):
    assert lpt(argv[0], "--store", str(tmp_path / "s"), *argv[1:]) == 1
    assert "invalid_" in capsys.readouterr().err
