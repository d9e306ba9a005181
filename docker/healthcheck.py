"""Container health check: exit 0 when the local lpt-serve answers GET /healthz with 200, else 1.

Standard library only (the image has Python but maybe no curl). The port comes from LPT_PORT, the same
variable the service reads; the host is loopback because the check runs inside the container.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("LPT_PORT", "8000")
    url = f"http://127.0.0.1:{port}/healthz"
    timeout = float(os.environ.get("LPT_HEALTHCHECK_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url}: HTTP {response.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
