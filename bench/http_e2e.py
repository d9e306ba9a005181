"""End to end over HTTP: a real ``lpt-serve`` subprocess on loopback, load from its own process, engine alongside.

For one task and for ``--tasks`` tasks with Zipf popularity (spread over ``--tenants`` API keys), a closed-loop
concurrency sweep measures images/s, p50/p95/p99 latency, error and 429 rates. Right after each HTTP run,
while the server is idle, the benchmark process times ``service.engine.Engine.infer`` on its own copy of the
backbone at the mean batch size the server formed in that run (read from ``/metrics``) with the same task mix,
so ``HTTP / engine`` is a paired ratio on the same machine state. Repeats alternate; medians are reported.
Then an open-loop (Poisson) run at half the peak rate gives the p99 to compare with
``2 x (max_wait + one batch forward)``.

Each closed-loop (scenario, clients) run is repeated per front end (``--protocols``): ``/v1/classify``, the Open
Inference Protocol's REST with binary tensors (``oip-rest``) and its gRPC (``oip-grpc``), in alternating order, so
OIP / v1 throughput is compared at the same clients and task mix (target: >= 0.95).

Before anything is timed, classify responses (and OIP responses, over each protocol run) must equal the engine's
probabilities for the same image and prompt set (single- and mixed-task batches), and the server must run the
same backbone fingerprint.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import torch

from bench.common import (
    BenchmarkCommand,
    CheckFailed,
    cifar_jpegs,
    default_weights,
    latency_summary,
    make_set,
    on_engine_thread,
    resident,
    run_metadata,
    sync,
)
from bench.loadgen import PROTOCOLS, LoadProcess, LoadSpec, Target, oip_rest_body, zipf_weights
from bench.options import BackboneOptions, ComputeOptions, ProbabilityCheck, ProcessThreads, fields_from, option
from bench.server import LptServe, ServeOptions, metric_delta, scrape
from lpt.backbone import load_backbone
from lpt.forward import COMPUTE_DTYPES
from lpt.prompt_set import encode
from service.engine import Engine
from service.images import ImageDecoder
from service.oip import proto as oip_pb
from service.resident import ResidentSet

TARGET_RATIO = 0.75
OIP_TARGET_RATIO = 0.95  # Open Inference Protocol throughput against /v1 at the same clients and task mix
SCENARIOS = ("1task", "zipf")


@dataclass
class HttpConfig(ProbabilityCheck, ProcessThreads, ComputeOptions, BackboneOptions):
    """Defaults: the CPU setting (DeiT-Tiny 224 px, float32) with the service's batching defaults."""

    img_size: int | None = option(None)
    max_batch_size: int = option(32)
    max_wait_ms: float = option(5.0)
    queue_size: int = option(1024)
    concurrency: tuple[int, ...] = option((1, 4, 16, 64), help="closed-loop clients, e.g. 1,4,16,32,64")
    # >= 10 batch forwards at the largest batch on CPU, or completions come in lumps
    duration_s: float = option(20.0, flag="--duration", help="measured seconds per run")
    warmup_s: float = option(2.0, flag="--warmup", help="unmeasured lead-in seconds per run")
    repeats: int = option(2, help="sweeps (alternating direction)")
    engine_repeats: int = option(5, help="engine timings after each run")
    half_load_s: float = option(30.0, flag="--half-load", help="seconds of the open-loop half-load run")
    tasks: int = option(100, help="tasks of the Zipf scenario")
    tenants: int = option(4, help="API keys the tasks are spread over")
    zipf_s: float = option(1.0)
    classes: int = option(10)
    images: int = option(64, help="distinct JPEGs cycled by the load generator")
    server_threads: int | None = option(None, help="OMP_NUM_THREADS of the server")
    seed: int = option(0)
    scenarios: tuple[str, ...] = option(SCENARIOS, help="1task, zipf or both")
    protocols: tuple[str, ...] = option(
        PROTOCOLS, help="front ends each closed-loop run is repeated with: v1, oip-rest (binary tensors), oip-grpc"
    )
    py_spy: Path | None = option(None, help="dir: py-spy the server at the highest concurrency")  # noqa: RUF009

    def __post_init__(self) -> None:
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown or "v1" not in self.protocols:
            raise ValueError(f"protocols must include v1 and come from {', '.join(PROTOCOLS)}; got {self.protocols}")


@dataclass
class Scenario:
    """Tasks on the server and their local resident copies (same bytes, same version)."""

    name: str
    targets: list[Target]
    entries: list[ResidentSet]  # aligned with targets

    def draw(self, n: int, gen: torch.Generator) -> list[ResidentSet]:
        weights = torch.tensor([t.weight for t in self.targets], dtype=torch.float64)
        idx = torch.multinomial(weights, n, replacement=True, generator=gen)
        return [self.entries[int(i)] for i in idx]


def upload_scenarios(serve: LptServe, client: httpx.Client, cfg: HttpConfig, backbone, device, dtype) -> dict:
    """Upload the 1-task set and the Zipf tasks; return the scenarios with their local resident copies."""
    tenants = list(serve.keys)
    compute = COMPUTE_DTYPES[dtype]

    def upload(tenant: str, task: str, seed: int) -> tuple[Target, ResidentSet]:
        ps = make_set(backbone.info, cfg.classes, seed=seed)
        resp = client.post(
            f"{serve.url}/v1/prompts", params={"task": task}, content=encode(ps), headers=serve.headers(tenant)
        )
        if resp.status_code != 201:
            raise RuntimeError(f"upload of {tenant}/{task} failed: {resp.status_code} {resp.text}")
        version = resp.json()["version"]
        return Target(task, serve.keys[tenant]), resident(tenant, task, version, ps, device, compute)

    out: dict[str, Scenario] = {}
    if "1task" in cfg.scenarios:
        target, entry = upload(tenants[0], "solo", 1)
        out["1task"] = Scenario("1 task", [target], [entry])
    if "zipf" in cfg.scenarios:
        weights = zipf_weights(cfg.tasks, cfg.zipf_s)
        pairs = [upload(tenants[i % len(tenants)], f"z{i:04d}", 1000 + i) for i in range(cfg.tasks)]
        for (target, _), w in zip(pairs, weights, strict=True):
            target.weight = w
        out["zipf"] = Scenario(f"{cfg.tasks} tasks, Zipf s={cfg.zipf_s}", [p[0] for p in pairs], [p[1] for p in pairs])
    return out


@dataclass(frozen=True)
class Expected:
    """What served answers must equal: the engine's probabilities for the same image and set, within ``atol``.

    Args:
        engine: the engine the answers are compared with (same backbone and dtype as the server's).
        images: the JPEG bytes as sent.
        tensors: the same images decoded as the service decodes them.
        atol: the largest difference of a probability.
    """

    engine: Engine
    images: list[bytes]
    tensors: list[torch.Tensor]
    atol: float

    def picks(self, sc: Scenario, count: int) -> list[tuple[int, int]]:
        """Up to ``count`` (image, target) index pairs, spread over the scenario's images and targets."""
        n = min(count, len(self.images) * len(sc.targets))
        return [(i % len(self.images), (i * 37) % len(sc.targets)) for i in range(n)]

    def probabilities(self, sc: Scenario, picks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The engine's probabilities of each picked image under its target's set, in one mixed batch."""
        batch = torch.stack([self.tensors[i] for i, _ in picks])
        return on_engine_thread(_infer, self.engine, batch, [sc.entries[t] for _, t in picks])


def check_responses(serve: LptServe, scenarios: dict[str, Scenario], expected: Expected) -> dict[str, float]:
    """Every checked response's full score vector must equal the engine's for the same image and set.

    The requests go out concurrently so the server batches them (mixed-task batches for the Zipf tasks).

    Raises:
        CheckFailed: naming the task, the image and the difference.
    """
    diffs: dict[str, float] = {}
    for key, sc in scenarios.items():
        picks = expected.picks(sc, 16)

        def ask(pick: tuple[int, int], sc: Scenario = sc, key: str = key) -> dict:
            img, t = pick
            target, entry = sc.targets[t], sc.entries[t]
            with httpx.Client(timeout=120.0) as c:
                resp = c.post(
                    f"{serve.url}/v1/classify",
                    params={"task": target.task, "top_k": entry.prompt_set.num_classes},
                    content=expected.images[img],
                    headers={"Authorization": f"Bearer {target.secret}", "Content-Type": "image/jpeg"},
                )
            if resp.status_code != 200:
                raise CheckFailed(f"{key}: classify {target.task} answered {resp.status_code}: {resp.text}")
            return resp.json()

        with ThreadPoolExecutor(max_workers=len(picks)) as pool:
            answers = list(pool.map(ask, picks))
        worst = 0.0
        for (img, t), answer, probs in zip(picks, answers, expected.probabilities(sc, picks), strict=True):
            worst = max(worst, compare_answer(answer, sc.entries[t], probs, expected.atol, f"{key} image {img}"))
        diffs[key] = worst
    return diffs


def check_oip_responses(
    serve: LptServe, scenarios: dict[str, Scenario], expected: Expected, protocols: tuple[str, ...]
) -> dict[str, float]:
    """Every OIP response's probabilities (REST binary, gRPC) must equal the engine's for the same image and set.

    Raises:
        CheckFailed: naming the protocol, the task, the image and the difference.
    """
    diffs: dict[str, float] = {}
    channel = grpc.insecure_channel(f"127.0.0.1:{serve.grpc_port}") if "oip-grpc" in protocols else None
    stub = oip_pb.client(channel) if channel is not None else None
    try:
        for key, sc in scenarios.items():
            picks = expected.picks(sc, 4)
            probabilities = expected.probabilities(sc, picks)
            for protocol in (p for p in protocols if p != "v1"):
                worst = 0.0
                for (img, t), probs in zip(picks, probabilities, strict=True):
                    target = sc.targets[t]
                    ask = oip_rest_probabilities if protocol == "oip-rest" else oip_grpc_probabilities
                    got = ask(serve, stub, target, expected.images[img])
                    diff = float(np.abs(got - probs.float().numpy()).max()) if got.shape == probs.shape else 1.0
                    if not diff <= expected.atol:
                        raise CheckFailed(f"{protocol} {key} image {img} task {target.task}: differs by {diff:.3g}")
                    worst = max(worst, diff)
                diffs[f"{key} {protocol}"] = worst
    finally:
        if channel is not None:
            channel.close()
    return diffs


def oip_rest_probabilities(serve: LptServe, _stub: Any, target: Target, image: bytes) -> np.ndarray:
    body, header_length = oip_rest_body(image)
    headers = {"Authorization": f"Bearer {target.secret}", "Inference-Header-Content-Length": header_length}
    resp = httpx.post(f"{serve.url}/v2/models/{target.task}/infer", content=body, headers=headers, timeout=120.0)
    if resp.status_code != 200:
        raise CheckFailed(f"oip-rest {target.task} answered {resp.status_code}: {resp.text}")
    length = int(resp.headers["Inference-Header-Content-Length"])
    return np.frombuffer(resp.content[length:], dtype="<f4")


def oip_grpc_probabilities(_serve: LptServe, stub: Any, target: Target, image: bytes) -> np.ndarray:
    request = oip_pb.ModelInferRequest(model_name=target.task)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    response = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {target.secret}"),), timeout=120.0)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4")


def compare_answer(answer: dict, entry: ResidentSet, probs: torch.Tensor, atol: float, where: str = "") -> float:
    """Check one classify response (all classes requested) against the engine's probabilities.

    Returns the largest score difference.

    Raises:
        CheckFailed: wrong version, a label that is not its class, a missing class or scores off by > ``atol``.
    """
    ps = entry.prompt_set
    if answer.get("version") != entry.key[2]:
        raise CheckFailed(f"{where}: {entry.key[1]} served version {answer.get('version')}, uploaded {entry.key[2]}")
    preds = answer.get("predictions", [])
    if sorted(p["index"] for p in preds) != list(range(ps.num_classes)):
        raise CheckFailed(f"{where}: {entry.key[1]} answered {len(preds)} classes of {ps.num_classes}")
    got = torch.zeros(ps.num_classes)
    for p in preds:
        if p["label"] != ps.class_names[p["index"]]:
            raise CheckFailed(f"{where}: label {p['label']!r} is not the name of class {p['index']}")
        got[p["index"]] = p["score"]
    diff = float((got - probs.float()).abs().max())
    if not diff <= atol:
        raise CheckFailed(f"{where}: task {entry.key[1]}: HTTP scores differ from the engine by {diff:.3g} > {atol}")
    return diff


def _infer(engine: Engine, images: torch.Tensor, entries: list[ResidentSet]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return engine.infer(images, entries)


def time_engine(
    engine: Engine, tensors: list[torch.Tensor], entries: list[ResidentSet], repeats: int, device: torch.device
) -> float:
    """Median seconds of one service-shaped batch: stack the rows, ``Engine.infer`` (bank, forward, to CPU).

    Runs in a dedicated thread, as the service's engine worker does.
    """
    return on_engine_thread(_time_engine, engine, tensors, entries, repeats, device)


def _time_engine(
    engine: Engine, tensors: list[torch.Tensor], entries: list[ResidentSet], repeats: int, device: torch.device
) -> float:
    rows = [tensors[i % len(tensors)] for i in range(len(entries))]
    times = []
    with torch.inference_mode():
        engine.infer(torch.stack(rows), entries)  # warm (allocator, shapes)
        for _ in range(repeats):
            start = time.perf_counter()
            engine.infer(torch.stack(rows), entries)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches the server formed between two scrapes; ``server_engine_images_per_s`` is images per second of
    the server's own forward time (its engine speed while it also served HTTP)."""
    batches = metric_delta(before, after, "lpt_batch_size_count")
    if batches <= 0:
        return {"batches": 0.0, "mean_batch": 0.0, "mean_tasks": 0.0, "mean_forward_ms": 0.0}
    images = metric_delta(before, after, "lpt_batch_size_sum")
    busy = metric_delta(before, after, "lpt_inference_duration_seconds_sum")
    return {
        "batches": batches,
        "mean_batch": images / batches,
        "mean_tasks": metric_delta(before, after, "lpt_batch_tasks_sum") / batches,
        "mean_forward_ms": 1e3 * busy / batches,
        "server_engine_images_per_s": images / busy if busy > 0 else 0.0,
    }


def start_py_spy(serve: LptServe, out_dir: Path, key: str, seconds: float) -> tuple[Any, Path] | None:
    """py-spy (when installed) sampling the server's threads for the measured window, raw stacks to a file."""
    exe = shutil.which("py-spy")
    if exe is None or serve.proc is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"py-spy-{key}.txt"
    cmd = [exe, "record", "--pid", str(serve.proc.pid), "--duration", str(int(seconds)), "--rate", "50"]
    cmd += ["--threads", "--nonblocking", "--format", "raw", "--output", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path


def finish_py_spy(proc: Any, path: Path, clients: int) -> dict[str, Any]:
    """Samples per thread and, for the engine thread, how many are inside the prompted forward."""
    proc.wait(timeout=120)
    threads: dict[str, int] = {}
    engine_forward = decode = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"error": f"py-spy wrote no {path}"}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread = stack.split(";")[0].split(": ", 1)[-1]
        name = "AnyIO worker" if thread.startswith("AnyIO worker") else thread
        threads[name] = threads.get(name, 0) + int(count)
        if name == "lpt-engine" and "prompted_forward" in stack:
            engine_forward += int(count)
        if "service/images.py" in stack:
            decode += int(count)
    return {
        "clients": clients,
        "raw": str(path),
        "samples_by_thread": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
        "engine_samples_in_forward": engine_forward,
        "decode_samples": decode,
    }


def run_http(cfg: HttpConfig, argv: list[str], log=print) -> dict[str, Any]:
    """Start the server, upload, check, sweep (alternating HTTP and engine), then the half-load run."""
    cfg.set_threads()
    device = torch.device(cfg.device)
    weights = cfg.weights or default_weights(cfg.backbone)
    backbone = load_backbone(cfg.backbone, weights, cfg.img_size).to(device)
    engine = Engine(backbone, device, COMPUTE_DTYPES[cfg.dtype])
    keys = {f"bench{i}": secrets.token_hex(16) for i in range(max(1, cfg.tenants))}
    # ``threads`` of this config are the benchmark process's; the server's are ``server_threads``.
    opts = fields_from(ServeOptions, cfg, weights=weights, threads=cfg.server_threads, grpc="oip-grpc" in cfg.protocols)
    images = cifar_jpegs(cfg.images)
    decoder = ImageDecoder(backbone.eval_transform, 10 * 1024 * 1024, 40_000_000)
    tensors = [decoder(b) for b in images]
    report: dict[str, Any] = {
        "benchmark": "http",
        "config": {**asdict(cfg), "weights": backbone.info.weights},
        "machine": run_metadata(device, ["http", *argv]),
        "checks": {},
        "sweep": [],
        "half_load": [],
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    log(f"http: starting lpt-serve ({cfg.backbone}, {cfg.device}, {cfg.dtype}, batch {cfg.max_batch_size})")
    with LptServe(opts, keys) as serve, httpx.Client(timeout=120.0) as client, LoadProcess() as load:
        served = client.get(f"{serve.url}/v1/backbone").json()["fingerprint"]
        if served != backbone.info.fingerprint:
            raise CheckFailed(f"server runs backbone {served[:16]}, benchmark {backbone.info.fingerprint[:16]}")
        scenarios = upload_scenarios(serve, client, cfg, backbone, device, cfg.dtype)
        atol = cfg.probability_atol(cfg.atol)
        expected = Expected(engine, images, tensors, atol)
        report["checks"] = check_responses(serve, scenarios, expected)
        report["checks"] |= check_oip_responses(serve, scenarios, expected, cfg.protocols)
        log(f"  checks passed: max |HTTP - engine| {report['checks']}")

        runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        for rep in range(cfg.repeats):
            for key, sc in scenarios.items():
                levels = cfg.concurrency if rep % 2 == 0 else cfg.concurrency[::-1]
                protocols = cfg.protocols if rep % 2 == 0 else cfg.protocols[::-1]
                for conc, protocol in ((c, p) for c in levels for p in protocols):
                    spec = LoadSpec(
                        url=serve.url,
                        targets=sc.targets,
                        images=images,
                        concurrency=conc,
                        duration_s=cfg.duration_s,
                        warmup_s=cfg.warmup_s,
                        seed=cfg.seed + rep,
                        protocol=protocol,
                        grpc_target=f"127.0.0.1:{serve.grpc_port}",
                    )
                    profile = cfg.py_spy is not None and rep == 0 and conc == max(cfg.concurrency) and protocol == "v1"
                    spy = start_py_spy(serve, cfg.py_spy, key, cfg.duration_s) if profile else None
                    before = scrape(client, serve.url)
                    res = load.run(spec)
                    stats = batch_stats(before, scrape(client, serve.url))
                    if spy is not None:
                        report.setdefault("profile", {})[key] = finish_py_spy(*spy, clients=conc)
                    b = max(1, round(stats["mean_batch"]))
                    t_engine = time_engine(engine, tensors, sc.draw(b, gen), cfg.engine_repeats, device)
                    res.update(stats, engine_batch=b, engine_images_per_s=b / t_engine)
                    res["ratio"] = res["images_per_s"] / res["engine_images_per_s"]
                    runs.setdefault((key, conc, protocol), []).append(res)
                    log(
                        f"  rep {rep} {key} c={conc} {protocol}: {res['images_per_s']:.1f} img/s, mean batch "
                        f"{stats['mean_batch']:.1f}, engine@{b} {b / t_engine:.1f} img/s, ratio {res['ratio']:.2f}"
                    )
        for (key, conc, protocol), reps in runs.items():
            lat = latency_summary([x for r in reps for x in r["latencies_s"]])
            requests = sum(r["requests"] for r in reps)
            report["sweep"].append(
                {
                    "scenario": key,
                    "concurrency": conc,
                    "protocol": protocol,
                    "images_per_s": statistics.median(r["images_per_s"] for r in reps),
                    "engine_images_per_s": statistics.median(r["engine_images_per_s"] for r in reps),
                    "ratio": statistics.median(r["ratio"] for r in reps),
                    "mean_batch": statistics.median(r["mean_batch"] for r in reps),
                    "mean_tasks": statistics.median(r["mean_tasks"] for r in reps),
                    "server_engine_images_per_s": statistics.median(r["server_engine_images_per_s"] for r in reps),
                    "error_rate": sum(r["error_rate"] * r["requests"] for r in reps) / max(1, requests),
                    "rate_429": sum(r["rate_429"] * r["requests"] for r in reps) / max(1, requests),
                    "latency": lat,
                    "runs": [{k: v for k, v in r.items() if k != "latencies_s"} for r in reps],
                }
            )

        for key, sc in scenarios.items():
            rows = [r for r in report["sweep"] if r["scenario"] == key and r["protocol"] == "v1"]
            peak = max(rows, key=lambda r: r["images_per_s"])
            rate = 0.5 * peak["images_per_s"]
            spec = LoadSpec(
                url=serve.url,
                targets=sc.targets,
                images=images,
                mode="open",
                rate=rate,
                concurrency=cfg.queue_size,
                duration_s=cfg.half_load_s,
                warmup_s=cfg.warmup_s,
                max_requests=int(rate * (cfg.half_load_s + cfg.warmup_s) * 2) + 10,
                seed=cfg.seed + 99,
            )
            before = scrape(client, serve.url)
            res = load.run(spec)
            stats = batch_stats(before, scrape(client, serve.url))
            b = max(1, round(stats["mean_batch"]))
            t_forward = time_engine(engine, tensors, sc.draw(b, gen), cfg.engine_repeats, device)
            bound_ms = 2e3 * (cfg.max_wait_ms / 1e3 + t_forward)
            lat = latency_summary(res.pop("latencies_s"))
            report["half_load"].append(
                {
                    "scenario": key,
                    "peak_images_per_s": peak["images_per_s"],
                    "peak_concurrency": peak["concurrency"],
                    "peak_ratio": peak["ratio"],
                    "peak_engine_batch": round(peak["mean_batch"]),
                    "peak_engine_images_per_s": peak["engine_images_per_s"],
                    "rate": rate,
                    "achieved_images_per_s": res["images_per_s"],
                    **stats,
                    "forward_ms_at_mean_batch": t_forward * 1e3,
                    "p99_bound_ms": bound_ms,
                    "latency": lat,
                    "statuses": res["statuses"],
                    "error_rate": res["error_rate"],
                }
            )
            log(f"  half load {key}: {rate:.1f} req/s offered, p99 {lat['p99_ms']:.0f} ms, bound {bound_ms:.0f} ms")
        report["server_log_tail"] = serve.log_tail(10)
    return report


def _ok(flag: bool) -> str:
    return "ok" if flag else "MISS"


def markdown(report: dict[str, Any]) -> str:
    """The sweep table, then the two targets per scenario."""
    lines = [
        "| scenario | clients | protocol | images/s | p50 ms | p95 ms | p99 ms | errors % | 429 % | mean batch "
        "| tasks/batch | engine images/s (same batch) | HTTP / engine | server forward images/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["sweep"]:
        lat = r["latency"]
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {r.get('protocol', 'v1')} | {r['images_per_s']:.1f} "
            f"| {lat['p50_ms']:.0f} "
            f"| {lat['p95_ms']:.0f} | {lat['p99_ms']:.0f} | {100 * r['error_rate']:.1f} | {100 * r['rate_429']:.1f} "
            f"| {r['mean_batch']:.1f} | {r['mean_tasks']:.1f} | {r['engine_images_per_s']:.1f} | {r['ratio']:.2f} "
            f"| {r.get('server_engine_images_per_s', 0.0):.1f} |"
        )
    lines += [
        "",
        "| scenario | peak HTTP images/s (clients) | engine images/s, same batch | HTTP / engine (>= 0.75) "
        "| half-load rate /s | mean batch | p99 ms | 2 x (max_wait + forward) ms | p99 target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for h in report["half_load"]:
        p99 = h["latency"]["p99_ms"]
        lines.append(
            f"| {h['scenario']} | {h['peak_images_per_s']:.1f} ({h['peak_concurrency']}) "
            f"| {h['peak_engine_images_per_s']:.1f} (batch {h['peak_engine_batch']}) "
            f"| {h['peak_ratio']:.2f} {_ok(h['peak_ratio'] >= TARGET_RATIO)} | {h['rate']:.1f} | {h['mean_batch']:.1f} "
            f"| {p99:.0f} | {h['p99_bound_ms']:.0f} | {_ok(p99 <= h['p99_bound_ms'])} |"
        )
    lines += oip_markdown(report["sweep"])
    for key, prof in report.get("profile", {}).items():
        if "samples_by_thread" in prof:
            threads = ", ".join(f"{t} {n}" for t, n in prof["samples_by_thread"].items())
            lines += [
                "",
                f"py-spy, {key}, {prof['clients']} clients (samples at 50 Hz of non-idle threads): {threads}; "
                f"engine-thread samples inside the prompted forward: {prof['engine_samples_in_forward']}; "
                f"image decode: {prof['decode_samples']}.",
            ]
    return "\n".join(lines)


def oip_ratio(oip: dict[str, Any], v1: dict[str, Any]) -> float:
    """OIP / v1 throughput: the median over repeats of each repeat's ratio (the two ran in the same repeat), or
    the ratio of the medians when the rows carry no per-repeat runs."""
    pairs = list(zip(oip.get("runs", []), v1.get("runs", []), strict=False))
    if pairs and len(pairs) == len(oip["runs"]) == len(v1["runs"]):
        return statistics.median(o["images_per_s"] / b["images_per_s"] for o, b in pairs if b["images_per_s"] > 0)
    return oip["images_per_s"] / v1["images_per_s"] if v1["images_per_s"] > 0 else 0.0


def oip_markdown(sweep: list[dict[str, Any]]) -> list[str]:
    """OIP throughput against /v1 at the same scenario and clients, with the 0.95 target (no rows: no OIP runs)."""
    v1 = {(r["scenario"], r["concurrency"]): r for r in sweep if r.get("protocol", "v1") == "v1"}
    rows = [r for r in sweep if r.get("protocol", "v1") != "v1" and (r["scenario"], r["concurrency"]) in v1]
    if not rows:
        return []
    lines = [
        "",
        "| scenario | clients | protocol | images/s | /v1 images/s | OIP / v1, median of per-repeat ratios "
        f"(>= {OIP_TARGET_RATIO}) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        base = v1[(r["scenario"], r["concurrency"])]
        ratio = oip_ratio(r, base)
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {r['protocol']} | {r['images_per_s']:.1f} "
            f"| {base['images_per_s']:.1f} | {ratio:.2f} {_ok(ratio >= OIP_TARGET_RATIO)} |"
        )
    return lines


COMMAND = BenchmarkCommand("http", HttpConfig, run_http, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
