"""``lpt-serve``: one flag per setting, generated from ``ServiceSettings``; each is also an ``LPT_*`` variable."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

import pydantic
import uvicorn
from pydantic.fields import FieldInfo

import lpt
from lpt.host_memory import retain_freed_memory
from lpt.options import flag_name, scalar_kind
from service.http_protocol import http_protocol
from service.images import guard_pillow_pixels
from service.settings import ServiceConfig, ServiceSettings, env_name

log = logging.getLogger("service.cli")  # not __name__: it is "__main__" under python -m


def build_parser() -> argparse.ArgumentParser:
    """The flags of every setting, with help, default and variable taken from the field."""
    p = argparse.ArgumentParser(
        prog="lpt-serve",
        description="Serve LPT prompt sets on one frozen timm ViT. Every flag is also an environment variable "
        "(shown with it); a flag wins over its variable.",
        argument_default=argparse.SUPPRESS,  # only what was given reaches the settings, so env and defaults apply
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {lpt.__version__}")
    for name, info in ServiceSettings.model_fields.items():
        p.add_argument(flag_name(name), dest=name, help=_help(name, info), **_argparse_kind(info.annotation))
    return p


def _help(name: str, info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    default = info.default
    if default is None:
        shown = extra.get("unset", "unset")
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = str(default)
    # argparse treats '%' in help as a format directive.
    return f"{info.description} (default: {shown}; env {env_name(name)})".replace("%", "%%")


def _argparse_kind(annotation: Any) -> dict[str, Any]:
    """argparse's type/choices/action for a setting's annotation (``X | None`` is treated as ``X``)."""
    kind = scalar_kind(annotation)
    if kind is None:
        raise TypeError(f"no flag type for setting annotation {annotation!r}")
    return kind


def load_settings(argv: list[str] | None = None) -> ServiceSettings:
    """Flags over ``LPT_*`` variables over defaults, validated (exits with a message on bad values)."""
    args = build_parser().parse_args(argv)
    try:
        return ServiceSettings(**vars(args))
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{flag_name(str(e['loc'][0]))} / {env_name(str(e['loc'][0]))}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise SystemExit(f"lpt-serve: invalid setting: {problems}") from None


def load_config(argv: list[str] | None = None) -> ServiceConfig:
    """The frozen config of a command line (and the environment)."""
    return load_settings(argv).freeze()


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything slow starts, so a taken port fails at once and clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
    # socket says TCP. With it on, a response's headers and body go out as two writes, the body waits for the
    # client's delayed ACK, and every request after the first on a kept-alive connection takes 40 ms longer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            reason = "the address is already in use (another lpt-serve?); choose another --port / LPT_PORT"
        else:
            reason = exc.strerror or str(exc)
        raise SystemExit(f"lpt-serve: cannot listen on {host}:{port}: {reason}") from None
    return sock


def ready_line(config: ServiceConfig, app: Any, sock: socket.socket) -> str:
    """What the service runs and where: enough to train a set it accepts (name, input size, fingerprint)."""
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    info = app.state.lpt.backbone.info
    size = "x".join(str(v) for v in info.input_size)
    return (
        f"lpt-serve ready on http://{host}:{port}: backbone {info.name} (input {size}, weights {info.weights}, "
        f"fingerprint {info.fingerprint[:16]}) on {config.device} ({config.compute_dtype})"
    )


class _Server(uvicorn.Server):
    """uvicorn's server, logging "ready" once the app has started and the socket accepts connections.

    A shutdown signal marks the service draining at once: uvicorn notices the signal only on its next 100 ms tick,
    and until then a request on a kept-alive connection would still be accepted as new work.
    """

    def __init__(self, uv_config: uvicorn.Config, config: ServiceConfig, sock: socket.socket):
        super().__init__(uv_config)
        self.service_config = config
        self.sock = sock

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info(ready_line(self.service_config, self.config.app, self.sock))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(self.config.app.state, "lpt", None)
        if service is not None:
            service.draining.set()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    config = settings.freeze()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.check_exposure()
    guard_pillow_pixels(config.max_image_pixels)  # process-wide, like the allocator below
    if retain_freed_memory(config.host_memory_retain_bytes):  # process-wide: before the backbone is loaded
        log.debug("host allocator keeps up to %d freed bytes per heap", config.host_memory_retain_bytes)
    sock = bind(config.host, config.port)
    if config.port == 0:  # any free port: the config (and the default replica id) names the one bound
        config = settings.model_copy(update={"port": sock.getsockname()[1]}).freeze()

    from service.app import create_app

    uv_config = uvicorn.Config(
        create_app(config),
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=config.shutdown_timeout,
        access_log=config.access_log,
        http=http_protocol(config.header_timeout),
        limit_concurrency=config.max_connections,
    )
    app = uv_config.app
    signal.signal(signal.SIGHUP, lambda *_: _reload_keys(app))
    _Server(uv_config, config, sock).run(sockets=[sock])


def _reload_keys(app: Any) -> None:
    """SIGHUP: read the API keys file again (the service logs whether it was applied)."""
    service = getattr(app.state, "lpt", None)
    if service is not None and not service.reload_keys():
        log.warning("SIGHUP: no keys file to read (--api-keys-file), or it was not applied")


if __name__ == "__main__":
    sys.exit(main())
