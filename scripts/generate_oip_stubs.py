"""Generate the Python stubs of the Open Inference Protocol's gRPC service from ``service/oip/proto/*.proto``.

The stubs are generated at commit time and committed (``*_pb2.py``, ``*_pb2_grpc.py``, left out of ruff); run this
after editing a ``.proto`` (needs ``grpcio-tools``, a dev dependency):

    python scripts/generate_oip_stubs.py

One edit follows ``protoc``: the messages go into lpt-serve's own descriptor pool (``service.oip.proto.POOL``)
instead of protobuf's process-wide default one. The protocol's messages are called ``inference.*`` by every
implementation, so a process that also loads another copy of the protocol (tritonclient's, in the tests; an
embedding application's) would otherwise fail with "duplicate symbol" at import. ``tests/unit/test_oip_codec.py``
checks that the committed stubs are what this script generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "service" / "oip" / "proto"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "DESCRIPTOR = POOL.AddSerializedFile("
IMPORTS_END = "# @@protoc_insertion_point(imports)\n"
POOL_IMPORT = "from service.oip.proto import POOL\n"


def generated_sources(out_dir: Path) -> dict[str, str]:
    """Run protoc on every ``.proto`` into ``out_dir``; the stubs by file name, with the pool edit applied."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main([*args, *(str(p) for p in protos)]) != 0:
        raise SystemExit("protoc failed")
    out: dict[str, str] = {}
    for path in sorted((out_dir / PROTO_DIR.relative_to(ROOT)).glob("*_pb2*.py")):
        out[path.name] = own_pool(path.read_text())
    return out


def own_pool(source: str) -> str:
    """``source`` with its file descriptor added to ``service.oip.proto.POOL`` (message modules only)."""
    if DEFAULT_POOL not in source:
        return source
    return source.replace(IMPORTS_END, IMPORTS_END + POOL_IMPORT, 1).replace(DEFAULT_POOL, OWN_POOL, 1)


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generated_sources(Path(tmp)).items():
            (PROTO_DIR / name).write_text(text)
            print(f"wrote {(PROTO_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
