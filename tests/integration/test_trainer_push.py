"""``lpt-train --push`` uploads to a real lpt-serve over real HTTP, and the service keeps the bytes unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import uvicorn

from lpt.backbone import load_backbone
from lpt.client import LptClient
from lpt.prompt_set import sha256
from service.app import create_app
from service.settings import ServiceConfig
from tests.support.ports import free_port
from tests.support.trainer_cli import train_argv
from tests.support.waiting import wait_until
from trainer import cli
from trainer.data import synthetic_long_tailed, write_image_folder

KEY = "push-test-secret"


@pytest.fixture
def service_url(tmp_path: Path):
    backbone = load_backbone("test_vit", "random:0", img_size=32)
    port = free_port()
    config = ServiceConfig(
        store=str(tmp_path / "store"), data_dir=tmp_path, api_keys={"acme": KEY}, port=port, grpc_port=0
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, backbone=backbone), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200,
        60,
        "the service's /readyz",
        retry_on=(httpx.HTTPError,),
    )
    yield url
    server.should_exit = True
    thread.join(30)


def test_trainer_push_uploads_the_written_file(tmp_path: Path, service_url: str) -> None:
    train = synthetic_long_tailed(num_classes=3, n_max=12, imbalance_ratio=4, img_size=32, seed=0)
    val = synthetic_long_tailed(num_classes=3, n_max=4, imbalance_ratio=1, img_size=32, seed=1)
    write_image_folder(train, tmp_path / "train")
    write_image_folder(val, tmp_path / "val")
    out = tmp_path / "ps.safetensors"

    def argv(api_key: str) -> list[str]:
        return train_argv(
            tmp_path / "train",
            tmp_path / "val",
            out,
            tmp_path / "r.json",
            batch_size=8,
            pool_size=3,
            top_k=1,
            push=service_url,
            task="pushed",
            api_key=api_key,
        )

    assert cli.main(argv(KEY)) == 0
    with LptClient(service_url, api_key=KEY) as client:
        shown = client.show("pushed")
        assert shown["active_version"] == 1
        assert shown["versions"][0]["sha256"] == sha256(out.read_bytes())
        image = (tmp_path / "train").joinpath(*_first_image(tmp_path / "train")).read_bytes()
        result = client.classify("pushed", [image])
        assert len(result[0]["predictions"]) == 3
    # A wrong key is refused by the service, and the CLI says so instead of pretending it pushed.
    assert cli.main(argv("wrong-key-123")) != 0


def _first_image(root: Path) -> tuple[str, str]:
    path = sorted(p for p in root.rglob("*") if p.is_file())[0]
    return path.parent.name, path.name


def _argv(tmp_path: Path, url: str, key: str, img_size: int = 32) -> list[str]:
    train = synthetic_long_tailed(num_classes=3, n_max=6, imbalance_ratio=2, img_size=32, seed=0)
    write_image_folder(train, tmp_path / "train")
    return train_argv(
        tmp_path / "train",
        tmp_path / "train",
        tmp_path / "ps.safetensors",
        tmp_path / "r.json",
        img_size=img_size,
        batch_size=4,
        pool_size=2,
        push=url,
        task="t",
        api_key=key,
    )


def _refused_before_training(tmp_path: Path, argv: list[str], caplog, expected: str) -> None:
    assert cli.main(argv) == 2
    assert not (tmp_path / "ps.ckpt.safetensors").exists()  # not one epoch was trained
    assert not (tmp_path / "ps.safetensors").exists()
    assert expected in caplog.text


def test_push_to_a_service_that_is_down_fails_before_training(tmp_path: Path, caplog) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    _refused_before_training(tmp_path, _argv(tmp_path, url, KEY), caplog, "does not answer")


def test_push_with_a_wrong_key_fails_before_training(tmp_path: Path, service_url: str, caplog) -> None:
    _refused_before_training(tmp_path, _argv(tmp_path, service_url, "wrong-key-123"), caplog, "refused (401")


def test_push_for_another_input_size_names_the_field_before_training(tmp_path: Path, service_url: str, caplog) -> None:
    argv = _argv(tmp_path, service_url, KEY, img_size=48)
    _refused_before_training(tmp_path, argv, caplog, "backbone input size differs")
