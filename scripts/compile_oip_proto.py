"""Compile the Open Inference Protocol's ``service/oip/proto/open_inference.proto`` into the binary descriptor set
committed next to it (``open_inference.binpb``, a ``FileDescriptorSet``).

No Python is generated: ``service.oip.proto`` loads the descriptor set into a descriptor pool of its own and builds
the message classes from it, and the gRPC server and clients follow its service descriptor. Run this after editing
the ``.proto`` (needs ``grpcio-tools``, a dev dependency); ``tests/unit/test_oip_stubs.py`` checks that the
committed descriptor set is what this script compiles:

    python scripts/compile_oip_proto.py

The ``.proto`` imports nothing, so the set holds one file; without source info, so that editing a comment does not
change it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "service" / "oip" / "proto"
PROTO = PROTO_DIR / "open_inference.proto"
DESCRIPTOR_SET = PROTO_DIR / "open_inference.binpb"


def compiled_descriptor_set() -> bytes:
    """The serialized ``FileDescriptorSet`` that protoc compiles from ``PROTO``."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / DESCRIPTOR_SET.name
        # -I the proto's folder: the file is named "open_inference.proto" in the set, wherever the tree lies.
        if protoc.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", str(PROTO)]) != 0:
            raise SystemExit("protoc failed")
        return out.read_bytes()


def main() -> int:
    DESCRIPTOR_SET.write_bytes(compiled_descriptor_set())
    print(f"wrote {DESCRIPTOR_SET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
