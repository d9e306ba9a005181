"""The ``lpt`` command: talk to a running service. Packages add sub-commands via ``lpt.commands`` entry points."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path

import httpx

import lpt
from lpt.client import ApiError, LptClient


def _client(args: argparse.Namespace) -> LptClient:
    return LptClient(args.url, args.api_key)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def cmd_push(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.push_prompt_set(args.task, Path(args.file).read_bytes()))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for t in c.tasks():
            print(f"{t['task']}\tv{t['active_version']}\t{t.get('num_classes') or '?'} classes")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.show(args.task))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.rollback(args.task, args.version))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.delete(args.task))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            results = c.classify(args.task, [Path(p).read_bytes() for p in args.images], args.top_k, args.version)
        except ApiError as exc:
            culprit = _failed_image(exc, args.images)
            if culprit is None:
                raise
            print(f"error {exc.status} {exc.code}: {culprit}: {exc.message}", file=sys.stderr)
            return 1
    for path, result in zip(args.images, results, strict=True):
        top = ", ".join(f"{p['label']} {p['score']:.3f}" for p in result["predictions"])
        print(f"{path}\tv{result['version']}\t{top}")
    return 0


def _failed_image(exc: ApiError, paths: list[str]) -> str | None:
    """The file an image error is about: the service names a part ``image[i]`` when a request carries several."""
    match = re.fullmatch(r"image\[(\d+)\]", exc.field or "")
    if match and int(match.group(1)) < len(paths):
        return paths[int(match.group(1))]
    return paths[0] if exc.field == "image" and len(paths) == 1 else None


def cmd_backbone(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.backbone())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpt", description="Manage and query an lpt-serve service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {lpt.__version__}")
    parser.add_argument("--url", default=os.environ.get("LPT_URL", "http://127.0.0.1:8000"), help="or LPT_URL")
    parser.add_argument("--api-key", default=os.environ.get("LPT_API_KEY"), help="or LPT_API_KEY")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("push", help="upload a prompt set (.safetensors) as a new active version")
    p.add_argument("file")
    p.add_argument("--task", required=True)
    p.set_defaults(func=cmd_push)
    sub.add_parser("tasks", help="list your tasks").set_defaults(func=cmd_tasks)
    p = sub.add_parser("show", help="a task's versions and classes")
    p.add_argument("task")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("rollback", help="make an earlier (or later) version active")
    p.add_argument("task")
    p.add_argument("--version", type=int, required=True)
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("delete", help="delete a task and all its versions")
    p.add_argument("task")
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("classify", help="classify images with a task")
    p.add_argument("images", nargs="+")
    p.add_argument("--task", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--version", type=int)
    p.set_defaults(func=cmd_classify)
    sub.add_parser("backbone", help="what the service runs (for training compatible sets)").set_defaults(
        func=cmd_backbone
    )
    for ep in entry_points(group="lpt.commands"):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plug-in must not take the client commands down with it
            print(f"warning: lpt sub-command {ep.name!r} unavailable: {exc}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ApiError as exc:
        print(f"error {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:  # refused, DNS, timeout: a message, not a traceback
        print(f"error: cannot reach {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an input file that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
