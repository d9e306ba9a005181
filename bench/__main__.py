"""``python -m bench <command> [options]``: dispatch to one benchmark module (see ``bench.COMMANDS``)."""

from __future__ import annotations

import importlib
import sys

from bench import COMMANDS


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m bench <command> [options]   (python -m bench <command> --help)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in sorted(COMMANDS.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark command.

    Args:
        argv: ``[command, *options]``; defaults to ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
