#!/usr/bin/env bash
# Stand-ins for the registry images the compose stack starts from, for a machine that reaches Debian's
# mirror (and PyPI) but no container registry: a Debian bookworm root made with debootstrap and
# `docker import`ed, then the images docker-compose.yml and docker/Dockerfile name, built from Debian packages
# under the same tags, so compose finds them locally and never pulls:
#
#   python:3.11-slim-bookworm   Debian's python3 (3.11) in a venv on PATH        (the CPU image's base)
#   redis:7.4-alpine            Debian's redis-server (7.0), user redis, /data
#   prom/prometheus:v2.53.2     Debian's prometheus (2.42), user nobody, ENTRYPOINT prometheus
#
# With TORCH_WHEEL and TORCHVISION_WHEEL set (CPU torch and the torchvision built for that torch version), it
# also fills docker/wheels/ (git-ignored), which the Dockerfile installs torch from before its index. PyPI's
# Linux torchvision is built against CUDA torch: with CPU torch its C ops cannot load, and torchvision 0.28
# then fails at import (it registers a fake kernel for torchvision::nms without checking the ops exist). The
# copy made here is that wheel with those two registrations guarded, versioned X+standin so pip prefers it.
# lpt-serve uses torchvision's transforms only, never its C ops.
#
# Run as root (debootstrap). CA_BUNDLE: the host's CA bundle, baked into the stand-ins so pip reaches PyPI
# through a TLS-intercepting proxy (PIP_CERT, SSL_CERT_FILE). Idempotent: an existing root is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOTFS=${ROOTFS:-/var/tmp/lpt-standin-rootfs}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
export DOCKER_BUILDKIT=0

if [ ! -x "$ROOTFS/bin/bash" ]; then
  debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
fi
cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/host-ca.crt"
tar -C "$ROOTFS" --exclude=./proc --exclude=./sys --exclude=./dev -c . \
  | docker import --change 'ENV SSL_CERT_FILE=/etc/ssl/host-ca.crt PIP_CERT=/etc/ssl/host-ca.crt' \
      --change 'CMD ["bash"]' - lpt-standin/debian:bookworm

build() {  # build TAG < Dockerfile
  echo "building stand-in $1"
  docker build -q -t "$1" - >/dev/null
}

build python:3.11-slim-bookworm <<'EOF'
FROM lpt-standin/debian:bookworm
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
EOF

build redis:7.4-alpine <<'EOF'
FROM lpt-standin/debian:bookworm
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server"]
EOF

build prom/prometheus:v2.53.2 <<'EOF'
FROM lpt-standin/debian:bookworm
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF

if [ -n "${TORCH_WHEEL:-}" ] && [ -n "${TORCHVISION_WHEEL:-}" ]; then
  cp "$TORCH_WHEEL" docker/wheels/
  python3 - "$TORCHVISION_WHEEL" docker/wheels <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
name, version = src.name.split("-")[:2]
local = f"{version}+standin"
old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{local}.dist-info/"
guard = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))"
files = {}
with zipfile.ZipFile(src) as zin:
    for item in zin.infolist():
        data = zin.read(item)
        path = item.filename.replace(old_info, new_info)
        if path == "torchvision/_meta_registrations.py":
            text, n = re.subn(r"^@torch\.library\.register_fake\((.*)\)$", guard, data.decode(), flags=re.M)
            assert n, "nothing to patch"
            data = text.encode()
        elif path == new_info + "METADATA":
            data = re.sub(rb"^Version: .*$", f"Version: {local}".encode(), data, count=1, flags=re.M)
        if not path.endswith("RECORD"):
            files[path] = data
record = []
for path, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(data)}")
record.append(new_info + "RECORD,,")
files[new_info + "RECORD"] = ("\n".join(record) + "\n").encode()
target = out / src.name.replace(f"-{version}-", f"-{local}-")
with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
    for path, data in files.items():
        zout.writestr(path, data)
print(f"wrote {target}")
EOF
fi
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'standin|python:3.11|redis:7.4|prometheus:v2'
