"""Helpers every benchmark shares. Bench modules import this one; it imports no bench module but the leaf
``bench.real_data`` (where the data files are), so the dependencies point one way.

Correctness-check failures, default weights, percentiles and latency summaries, run metadata (machine, versions,
load average), command-line options generated from a benchmark's config dataclass, prompt sets of a given
shape, resident entries built the way the service builds them, and a real ``lpt-serve`` subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import timm
import torch

from bench.real_data import CIFAR_ZIP, DEIT_WEIGHTS
from lpt.backbone import BackboneInfo
from lpt.init import init_prompt_set
from lpt.options import field_default, scalar_kind, without_none
from lpt.prompt_set import PromptSet
from prompts_store.base import StoredVersion

if TYPE_CHECKING:
    from service.resident import ResidentSet, SetKey

T = TypeVar("T")
Config = TypeVar("Config")  # a benchmark's config dataclass
REPO = Path(__file__).resolve().parents[1]


class CheckFailed(AssertionError):
    """A benchmark's correctness check failed: the numbers would measure a wrong computation."""


def default_weights(backbone: str) -> str:
    """The shared real DeiT-Tiny file for DeiT-Tiny when it is present; seeded random weights otherwise."""
    if backbone.split(".")[0] == "deit_tiny_patch16_224" and DEIT_WEIGHTS.is_file():
        return str(DEIT_WEIGHTS.resolve())
    return "random:0"


# ------------------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``, NaN for no values.

    Linear interpolation between the closest ranks (numpy's default, "linear"): the sorted values sit at
    positions 0 .. n-1 and the percentile is read at position ``(n - 1) * q / 100``. Every benchmark's
    percentiles come from this one function.

    Args:
        values: samples, in any order.
        q: the percentile, 0 (the smallest) to 100 (the largest).
    """
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, mean, p50/p95/p99 (``percentile``) and max in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {
        "count": len(ms),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
    }


# ------------------------------------------------------------------------------------------------ run metadata
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's word for it elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, threads, versions, date."""
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages (the machine is shared: say how busy it was)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run_metadata(device: torch.device, command: Sequence[str]) -> dict[str, Any]:
    """Machine, versions, date, the exact command and the load average at the start."""
    info = machine_info(device)
    info["loadavg_start"] = loadavg()
    info["command"] = "python -m bench " + " ".join(command)
    info.update(git_state())
    return info


def git_state() -> dict[str, Any]:
    """The commit, and the files of the code under test (lpt/, service/, bench/) that differ from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "lpt", "service", "bench", "prompts_store").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": [line[3:] for line in dirty]}


# ------------------------------------------------------------------------------------------------ command line
def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A config dataclass field together with its command-line option (see ``add_dataclass_args``).

    Args:
        default: the field's default (sequences as tuples: a config holds no mutable defaults).
        help: the option's help (its default is appended).
        flag: the option string when it is not the field's name as ``--kebab-case``.
        choices: the allowed values (a ``Literal`` annotation gives them too).
        default_factory: computes the default instead (one that depends on the machine).
    """
    metadata = {"help": help, "flag": flag, "choices": choices}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str:
    """The option string of a config field: ``batch_sizes`` -> ``--batch-sizes`` unless ``option(flag=...)``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def comma_separated(item: Callable[[str], Any], container: type = list) -> Callable[[str], Any]:
    """An argparse type reading ``8,16,32`` as a list (or tuple) of ``item``; blanks and spaces are ignored."""

    def parse(text: str) -> Any:
        return container(item(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"  # argparse names it in errors
    return parse


def option_kind(annotation: Any) -> dict[str, Any]:
    """argparse's ``type``, ``action`` or ``choices`` for a field annotation (``X | None`` reads as ``X``).

    Args:
        annotation: a resolved annotation: bool, int, float, str, Path, a ``Literal``, or a ``tuple[X, ...]``
            or ``list[X]`` of int, float or str (written ``8,16,32`` on the command line).

    Raises:
        TypeError: for any other annotation.
    """
    annotation, _ = without_none(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args[0] in (int, float, str) and (origin is list or args[1:] == (Ellipsis,)):
        return {"type": comma_separated(args[0], origin), "metavar": f"{args[0].__name__.upper()},..."}
    kind = scalar_kind(annotation)
    if kind is None:
        raise TypeError(f"no option type for the annotation {annotation!r}")
    return kind


def _help(f: dataclasses.Field, default: Any) -> str | None:
    text = f.metadata.get("help")
    if isinstance(default, bool) or default is None:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
    # argparse reads '%' in help as a format directive.
    return f"{text + ' ' if text else ''}(default: {shown})".replace("%", "%%")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the config dataclass ``cls``: flag and help from ``option``, type from the annotation.

    A bool field gets ``--name`` and ``--no-name``; tuples are comma-separated (``--batch-sizes 8,16,32``);
    ``Literal`` annotations and ``option(choices=...)`` limit the values. The parsed value lands in ``dest`` = the
    field's name, so ``from_args`` builds the config from the namespace.

    Args:
        parser: the parser to extend.
        cls: a dataclass whose fields all have defaults.
    """
    hints = typing.get_type_hints(cls)
    defaults = {}
    for f in dataclasses.fields(cls):
        kind = option_kind(hints[f.name])
        if f.metadata.get("choices") is not None:
            kind["choices"] = f.metadata["choices"]
        if "type" in kind and "choices" not in kind:
            kind.setdefault("metavar", flag_of(f)[2:].upper().replace("-", "_"))  # the flag's name, not the field's
        defaults[f.name] = field_default(f)
        parser.add_argument(flag_of(f), dest=f.name, help=_help(f, defaults[f.name]), **kind)
    # Defaults go through set_defaults: BooleanOptionalAction appends its own "(default: ...)" to the help otherwise.
    parser.set_defaults(**defaults)


def from_args(cls: type[Config], namespace: argparse.Namespace) -> Config:
    """The config dataclass ``cls`` built from a namespace parsed with ``add_dataclass_args``."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def to_argv(cfg: Any) -> list[str]:
    """The options that ``config_parser`` parses back into ``cfg`` (fields left at None are left out)."""
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            argv.append(flag_of(f) if value else "--no-" + flag_of(f)[2:])
        elif value is not None:
            argv += [flag_of(f), ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)]
    return argv


def config_parser(cls: type, prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: one option per field of ``cls`` and ``--json`` (the report's path).

    Args:
        cls: the benchmark's config dataclass.
        prog: ``python -m bench <command>``.
        doc: the module docstring; its first paragraph is the description.
    """
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    add_dataclass_args(parser, cls)
    parser.add_argument("--json", type=Path, default=None, help="write the full report (raw numbers included) here")
    return parser


def parse_config(
    parser: argparse.ArgumentParser, cls: type[Config], argv: list[str] | None
) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` into (config, namespace); a config that rejects its values (``ValueError``) is a usage error.

    Args:
        parser: from ``config_parser`` (plus any options of the benchmark's own).
        cls: the config dataclass.
        argv: the options (``sys.argv[1:]`` when None).
    """
    namespace = parser.parse_args(argv)
    try:
        return from_args(cls, namespace), namespace
    except ValueError as exc:
        parser.error(str(exc))


def parse_benchmark_args(
    cls: type[Config], argv: list[str] | None, prog: str, doc: str | None
) -> tuple[Config, Path | None]:
    """A benchmark's (config, JSON path or None) from ``argv``: ``config_parser`` then ``parse_config``."""
    cfg, namespace = parse_config(config_parser(cls, prog, doc), cls, argv)
    return cfg, namespace.json


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    report.setdefault("machine", {})["loadavg_end"] = loadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


@dataclass
class SetShape:
    """The shape of the prompt sets a benchmark makes (its options, shared by the benchmarks that make sets)."""

    shape_backbone: str = option("vit_base_patch16_224", help="sets are shaped for this backbone")
    classes: int = option(100)
    prompt_length: int = option(10, help="L, prompt tokens per block")
    pool_size: int = option(20, help="P, group prompts")
    share_blocks: int = option(6, help="S, blocks with the shared prompt only")
    top_k: int = option(2, help="k, group prompts averaged per image")

    def make_set(self, info: BackboneInfo, seed: int = 0) -> PromptSet:
        """A set of this shape for ``info``."""
        return make_set(info, self.classes, self.prompt_length, self.pool_size, self.share_blocks, self.top_k, seed)


def make_set(
    info: BackboneInfo,
    classes: int,
    prompt_length: int = 10,
    pool_size: int = 20,
    share_blocks: int = 6,
    top_k: int = 2,
    seed: int = 0,
) -> PromptSet:
    """A valid prompt set of the given shape for ``info`` (VPT-style random init, reproducible)."""
    names = [f"s{seed}-c{c}" for c in range(classes)]
    return init_prompt_set(
        info, names, prompt_length=prompt_length, pool_size=pool_size, share_blocks=share_blocks, top_k=top_k, seed=seed
    )


def resident(
    tenant: str,
    task: str,
    version: int,
    ps: PromptSet,
    device: torch.device | str,
    dtype: torch.dtype,
    model: torch.nn.Module | None = None,
) -> ResidentSet:
    """A resident entry exactly as ``PromptCache`` makes one (device copy, one-slot bank, keys/values with a model)."""
    # Imported here: the engine and allocator benchmarks measure lpt alone and never need the service.
    from service.resident import make_resident

    return make_resident(StoredVersion(tenant, task, version, "", 0, 0.0), ps, device, dtype, model)


def set_key(info: StoredVersion) -> SetKey:
    """The cache key of a stored version (what ``PromptCache.acquire`` takes)."""
    from service.resident import SetKey

    return SetKey(info.tenant, info.task, info.version, info.sha256)


def cifar_jpegs(count: int) -> list[bytes]:
    """``count`` real JPEGs (CIFAR-10 test split) from the shared zip; synthetic JPEGs when it is absent."""
    import io
    import zipfile

    if CIFAR_ZIP.is_file():
        with zipfile.ZipFile(CIFAR_ZIP) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith(".jpg"))
            step = max(1, len(names) // count)
            return [zf.read(n) for n in names[::step][:count]]
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        arr = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def on_engine_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a fresh dedicated thread and return its result, as the service runs every forward.

    The service's forwards run in the ``EngineWorker`` thread, not the main thread; timing the engine the
    same way keeps the comparison fair (on a busy machine, torch's OpenMP team of the main thread behaved
    very differently from a worker thread's).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine") as pool:
        return pool.submit(fn, *args).result()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeOptions:
    """The ``lpt-serve`` flags a benchmark sets (everything else stays the service default)."""

    backbone: str = "deit_tiny_patch16_224"
    weights: str = "random:0"
    img_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    store: str | None = None  # None: an embedded store in the server's temp dir
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 1024
    request_timeout: float = 30.0
    threads: int | None = None  # OMP/torch threads of the server process; None: torch's default
    grpc: bool = False  # serve the Open Inference Protocol over gRPC too (on a free port, ``LptServe.grpc_port``)
    extra_args: tuple[str, ...] = ()  # further lpt-serve flags, as given


class LptServe:
    """A real ``lpt-serve`` subprocess on a free loopback port, with API keys, stopped on exit.

    Args:
        opts: the flags.
        keys: tenant -> secret (sent as ``LPT_API_KEYS``).
        ready_timeout: seconds to wait for ``/readyz``.
        repo: the checkout whose code the server runs (another one: a before/after comparison in one run).
    """

    def __init__(self, opts: ServeOptions, keys: dict[str, str], ready_timeout: float = 300.0, repo: Path = REPO):
        self.repo = Path(repo)
        self.opts = opts
        self.keys = keys
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port() if opts.grpc else 0
        self._tmp = tempfile.TemporaryDirectory(prefix="lpt-bench-serve-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        o = self.opts
        cmd = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backbone", o.backbone, "--backbone-weights", o.weights, "--device", o.device, "--dtype", o.dtype]
        cmd += ["--store", o.store or str(Path(self._tmp.name) / "store"), "--data-dir", self._tmp.name]
        cmd += ["--max-batch-size", str(o.max_batch_size), "--max-wait-ms", str(o.max_wait_ms)]
        cmd += ["--queue-size", str(o.queue_size), "--request-timeout", str(o.request_timeout)]
        cmd += ["--log-level", "warning"]
        if o.img_size:
            cmd += ["--img-size", str(o.img_size)]
        return [*cmd, *o.extra_args]

    def start(self) -> LptServe:
        env = dict(os.environ)
        env["LPT_API_KEYS"] = ",".join(f"{t}:{s}" for t, s in self.keys.items())
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        env["LPT_GRPC_PORT"] = str(self.grpc_port)  # a variable: checkouts without the setting ignore it
        if self.repo != REPO:
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
        if self.opts.threads:
            env["OMP_NUM_THREADS"] = str(self.opts.threads)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"lpt-serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lpt-serve not ready within {self.ready_timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._tmp.cleanup()

    def __enter__(self) -> LptServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    """The server's Prometheus counters and histogram sums/counts, as ``name{labels} -> value``."""
    out: dict[str, float] = {}
    for line in client.get(f"{url}/metrics").text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def checklist(checks: dict[str, bool]) -> list[str]:
    """A report's checks as Markdown task-list lines (``- [x] met``, ``- [ ] missed``)."""
    return [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]


def run_cli(
    name: str,
    argv: list[str] | None,
    parse_args: Callable[[list[str]], tuple[Any, str | None]],
    run: Callable[..., dict],
    markdown: Callable[[dict], str],
) -> int:
    """The shared ``main`` of the service benchmarks: parse, run (correctness checked first), print, write JSON.

    Args:
        name: benchmark name for messages.
        argv: command-line arguments (``sys.argv[1:]`` when None).
        parse_args: argv -> (config, JSON path or None).
        run: ``run(config, argv, log=...)`` -> report; raises CheckFailed before timing anything wrong.
        markdown: report -> table text.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, json_path = parse_args(argv)
    try:
        report = run(cfg, argv, log=lambda m: print(m, file=sys.stderr, flush=True))
    except CheckFailed as exc:
        print(f"{name} benchmark: CORRECTNESS CHECK FAILED, nothing timed: {exc}", file=sys.stderr)
        return 1
    print(markdown(report))
    write_json(json_path, report)
    return 0
