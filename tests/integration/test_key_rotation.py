"""API keys rotate with overlap and without a restart: several keys per tenant, the keys file read again when it
changes or on SIGHUP, and a bad file leaves the keys in force."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.support.lpt_serve import TEST_BACKBONE_ARGS, LptServe
from tests.support.service_app import make_config, serve_in_thread
from tests.support.waiting import wait_until

OLD = "acme-old-secret-0123456789"
NEW = "acme-new-secret-9876543210"
OTHER = "globex-secret-0123456789"


def status(served, secret: str) -> int:
    return served.get("/v1/prompts", headers={"Authorization": f"Bearer {secret}"}).status_code


def test_a_tenant_may_hold_several_keys(backbone, tmp_path):
    config = make_config(tmp_path, api_keys={"acme": (OLD, NEW), "globex": OTHER})
    with serve_in_thread(config, backbone) as s:
        assert [status(s, k) for k in (OLD, NEW, OTHER)] == [200, 200, 200]
        r = s.post("/v1/prompts?task=t", content=b"x", headers={"Authorization": f"Bearer {NEW}"})
        assert r.status_code == 422  # acme's new key acts as acme
        assert status(s, "acme-unknown-secret-000000") == 401


def test_the_keys_file_is_read_again_when_it_changes_and_a_bad_one_changes_nothing(backbone, tmp_path, caplog):
    keys = tmp_path / "keys"
    keys.write_text(f"acme:{OLD}\n")
    config = make_config(tmp_path, api_keys={"globex": OTHER}, api_keys_file=keys)
    with serve_in_thread(config, backbone) as s:
        assert [status(s, k) for k in (OLD, NEW, OTHER)] == [200, 401, 200]
        keys.write_text(f"acme:{OLD}\nacme:{NEW}\n")  # overlap: clients move to the new key
        wait_until(lambda: status(s, NEW) == 200, 10, "the new key to be accepted")
        assert status(s, OLD) == 200 and status(s, OTHER) == 200
        keys.write_text(f"acme:{NEW}\n")  # the old key retires
        wait_until(lambda: status(s, OLD) == 401, 10, "the old key to be refused")
        for bad in ("acme\n", "acme:changeme-changeme-changeme\n", "Not An Id:whatever-whatever-1234\n"):
            keys.write_text(bad)
            wait_until(lambda: "not applied" in caplog.text, 10, "the bad file to be reported")
            caplog.clear()
            assert [status(s, k) for k in (OLD, NEW, OTHER)] == [401, 200, 200]  # the keys in force stay
            assert bad.split(":")[-1].strip() not in caplog.text  # a secret is never logged
        keys.unlink()
        wait_until(lambda: "not applied" in caplog.text, 10, "the missing file to be reported")
        assert status(s, NEW) == 200


@pytest.mark.slow
def test_sighup_reads_the_keys_file_again(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"acme:{OLD}\n")
    args = [*TEST_BACKBONE_ARGS, "--api-keys-file", str(keys)]
    with LptServe(tmp_path / "serve.log", args, data_dir=tmp_path / "data") as server:
        http = httpx.Client(base_url=server.url, timeout=10)

        def code(secret: str) -> int:
            return http.get("/v1/prompts", headers={"Authorization": f"Bearer {secret}"}).status_code

        assert (code(OLD), code(NEW)) == (200, 401)
        # Same size, same inode and the old modification time: only the signal can tell the service.
        stat = keys.stat()
        with keys.open("r+") as f:
            f.write(f"acme:{NEW}\n")
        os.utime(keys, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert keys.stat().st_size == stat.st_size
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_until(lambda: code(NEW) == 200, 10, "SIGHUP to apply the new key")
        assert code(OLD) == 401
        http.close()


def test_a_keys_file_that_cannot_be_read_stops_the_start(tmp_path: Path):
    from tests.support.lpt_serve import run_lpt_serve

    done = run_lpt_serve(*TEST_BACKBONE_ARGS, "--api-keys-file", str(tmp_path / "missing"))
    assert done.returncode != 0 and "keys file" in (done.stdout + done.stderr)
