"""The decode pool's scheduling, on the real decoder: a tenant with nothing running is served while another
tenant's decodes run, a tenant's backlog is bounded in pixels, and a request past its deadline is not decoded.

A gate holds chosen decodes (instrumentation around the real decoder), so nothing depends on timing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from service.decode_pool import DecodePool
from service.errors import DeadlineExceeded, QueueFull
from service.images import ImageDecoder
from tests.support.images import png_bytes
from tests.support.waiting import wait_until

SMALL = png_bytes((40, 40))
HELD = png_bytes((41, 40))  # decodes of this image wait at the gate


class GatedDecoder(ImageDecoder):
    """The real decoder; decodes of ``HELD`` wait until ``gate`` opens, and every decode is counted."""

    def __init__(self, backbone) -> None:
        super().__init__(backbone.eval_transform, 1 << 20, 1 << 24)
        self.gate = threading.Event()
        self.running = 0
        self.most_running = 0
        self.decoded = 0
        self._lock = threading.Lock()

    def decode_all(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if HELD in blobs:
                assert self.gate.wait(30)
            return super().decode_all(blobs)
        finally:
            with self._lock:
                self.running -= 1
                self.decoded += 1


@pytest.fixture
def decoder(backbone) -> GatedDecoder:
    return GatedDecoder(backbone)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)


def submit(loop, pool: DecodePool, tenant: str, blob: bytes, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    return asyncio.run_coroutine_threadsafe(pool.decode_all(tenant, [blob], deadline), loop)


def test_a_tenant_with_nothing_running_is_decoded_while_another_tenants_decodes_hold_the_cores(decoder, loop):
    pool = DecodePool(decoder, threads=2, niceness=0, tenant_pixels=10**9)
    flood = [submit(loop, pool, "a", HELD) for _ in range(8)]
    wait_until(lambda: decoder.running == 2, 10, "tenant a's first two decodes to run")
    quiet = submit(loop, pool, "b", SMALL)
    assert quiet.result(10)[0].shape == (3, 32, 32)  # decoded while a's decodes are still held
    assert decoder.running == 2 and decoder.most_running <= 3  # a never ran more than its two
    decoder.gate.set()
    assert all(len(f.result(30)) == 1 for f in flood)
    pool.close()


def test_a_tenant_past_its_pixel_budget_is_refused_at_once_and_others_are_not(decoder, loop):
    pixels = 41 * 40
    pool = DecodePool(decoder, threads=1, niceness=0, tenant_pixels=3 * pixels)
    held = [submit(loop, pool, "a", HELD) for _ in range(3)]
    wait_until(lambda: decoder.running == 1, 10, "tenant a's first decode to run")
    with pytest.raises(QueueFull, match="limit"):
        submit(loop, pool, "a", HELD).result(10)
    with pytest.raises(QueueFull):
        pool.check_room("a")  # spent: the next request is refused before its body is read
    pool.check_room("b")
    assert submit(loop, pool, "b", SMALL).result(10)
    decoder.gate.set()
    for f in held:
        f.result(30)
    assert submit(loop, pool, "a", SMALL).result(10)  # its budget came back with its decodes
    pool.close()


def test_a_request_whose_deadline_passes_while_it_waits_is_not_decoded(decoder, loop):
    pool = DecodePool(decoder, threads=1, niceness=0, tenant_pixels=10**9)
    first = [submit(loop, pool, "a", HELD) for _ in range(2)]  # one decoding, one waiting for a's one slot
    wait_until(lambda: decoder.running == 1, 10, "the first decode to run")
    late = submit(loop, pool, "a", SMALL, timeout_s=0.2)
    with pytest.raises(DeadlineExceeded):
        late.result(10)
    decoder.gate.set()
    for f in first:
        f.result(30)
    wait_until(lambda: decoder.decoded == 2, 10, "the held decodes to finish")
    time.sleep(0.2)
    assert decoder.decoded == 2  # the late request was dropped, not decoded
    pool.close()
