"""``lpt-serve``: flags mirror ``LPT_*`` environment variables; flags win."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from service.settings import ServiceSettings

DEMO_BACKBONE = ("deit_tiny_patch16_224", "random:0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpt-serve", description="Serve LPT prompt sets on one frozen timm ViT.")
    add = p.add_argument
    add("--host", help="bind address (default 127.0.0.1)")
    add("--port", type=int, help="port (default 8000)")
    add("--backbone", help="timm model name (default vit_base_patch16_224.augreg_in21k)")
    add("--backbone-weights", help="'hub', a weights file path, or 'random:SEED'")
    add("--img-size", type=int, help="input size, when not the model's default")
    add("--store", help="redis://... or rediss://... URL, or a path for the embedded store (default: DATA_DIR/store)")
    add("--data-dir", type=Path, help="directory for the embedded store and demo files (default ./data)")
    add("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    add("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype (auto: bf16 on cuda)")
    add("--max-batch-size", type=int, help="images per forward (default 32)")
    add("--max-wait-ms", type=float, help="how long a batch stays open after its first image (default 5)")
    add("--queue-size", type=int, help="images waiting at most before 429 (default 1024)")
    add("--tenant-queue-share", type=float, help="share of the queue one tenant may fill with keys (default 0.5)")
    add("--cache-bytes", type=int, help="device bytes for resident prompt sets (default 2 GiB)")
    add("--request-timeout", type=float, help="seconds before a classify answers 504 (default 10)")
    add("--max-image-bytes", type=int, help="largest encoded image (default 10 MiB)")
    add("--max-image-pixels", type=int, help="largest width*height (default 40M)")
    add("--max-classes", type=int, help="largest class count a prompt set may have (default 8192)")
    add("--max-prompt-bytes", type=int, help="largest prompt set upload (default 64 MiB)")
    add("--api-keys-file", type=Path, help="file of 'tenant:secret' lines (or LPT_API_KEYS=t1:s1,t2:s2)")
    add("--insecure", action="store_true", default=None, help="allow a non-loopback address without API keys")
    add("--demo", action="store_true", default=None, help="install a demo task; offline demo backbone by default")
    add("--shutdown-timeout", type=float, help="seconds to finish in-flight work on SIGTERM (default 20)")
    add("--log-level", help="debug, info, warning, error")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    demo = overrides.get("demo") or os.environ.get("LPT_DEMO", "").lower() in ("1", "true", "yes")
    # The demo must run offline: a seeded DeiT-Tiny unless a backbone was chosen explicitly.
    if demo and "backbone" not in overrides and "LPT_BACKBONE" not in os.environ:
        overrides["backbone"] = DEMO_BACKBONE[0]
        if "backbone_weights" not in overrides and "LPT_BACKBONE_WEIGHTS" not in os.environ:
            overrides["backbone_weights"] = DEMO_BACKBONE[1]
    config = ServiceSettings(**overrides).freeze()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.check_exposure()

    import uvicorn

    from service.app import create_app

    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=config.shutdown_timeout,
        access_log=False,
    )


if __name__ == "__main__":
    main()
