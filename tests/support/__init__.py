"""Helpers shared by every test suite; each module holds one kind of helper:

- ``ports``: ``free_port``, a TCP port free on loopback.
- ``waiting``: ``wait_until`` / ``wait_until_async``, bounded polling of a condition.
- ``metrics``: the one Prometheus text parser (prometheus_client's) and readers built on it.
- ``processes``: a logged child process (start, output, SIGTERM stop) and the console-script command line.
- ``lpt_serve``: the ``lpt-serve`` process launcher (free port, ready on /readyz, SIGTERM stop).
- ``redis_server``: a real ``redis-server`` per test, with fault injection, and its fixture helper.
- ``prompt_sets``: ``make_set``, the prompt-set builder, and its encoded bytes.
- ``trainer_cli``: ``lpt-train`` command lines (settings by field name; a short run on the suite's backbone).
- ``images``: request images (PNG/JPEG bytes) for the service tests.
- ``photos``: camera-like photos and their bytes under any EXIF orientation.
- ``resident``: small resident entries and leases for the cache, lease table and queue unit tests.
- ``service_app``: the real app in-process (async or from a thread), its configuration, keys and readers.
"""
