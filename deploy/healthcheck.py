#!/usr/bin/env python3
"""The image's HEALTHCHECK: GET http://127.0.0.1:$TANDEM_HTTP_PORT/health (default 9100, the
worker's HTTP port; the gateway's service sets its own port); exit 0 on a 2xx answer within
$TANDEM_HEALTH_TIMEOUT_S seconds (default 3), else 1 with the reason on stderr. Python's
standard library only: the slim image has no curl."""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("TANDEM_HTTP_PORT", "9100")
    path = os.environ.get("TANDEM_HEALTH_PATH", "/health")
    timeout_s = float(os.environ.get("TANDEM_HEALTH_TIMEOUT_S", "3"))
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            r.read(1 << 16)
            return 0
    except (urllib.error.URLError, OSError, ValueError) as e:
        sys.stderr.write(f"{url}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
