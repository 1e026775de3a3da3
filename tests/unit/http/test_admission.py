"""AdmissionControl: FIFO hand-over, bounded queue, cancellation, jittered Retry-After."""

from __future__ import annotations

import asyncio

import pytest

from bootd.service.admission import AdmissionControl, ConnectionLimits, Overloaded, TrustedNetworks


async def test_fifo_order_and_no_barging() -> None:
    adm = AdmissionControl(limit=1, queue=10, retry_after=2.0)
    await adm.acquire()
    order: list[int] = []

    async def worker(i: int) -> None:
        await adm.acquire()
        order.append(i)
        await asyncio.sleep(0)
        adm.release()

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert adm.queued == 5
    adm.release()
    # A newcomer arriving while the line drains must not jump it.
    assert not adm.try_acquire()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert adm.active == 0 and adm.try_acquire()


async def test_queue_full_raises_overloaded_with_reason() -> None:
    adm = AdmissionControl(limit=2, queue=1, retry_after=2.0, rng=lambda: 0.5)
    await adm.acquire()
    await adm.acquire()
    assert not adm.would_reject()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.would_reject()
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.retry_after == 3
    assert "2 streaming, 1 queued" in str(info.value)
    assert adm.stats().rejected == 1
    adm.release()
    await waiter
    assert adm.active == 2


async def test_cancelled_waiter_gives_up_its_place() -> None:
    adm = AdmissionControl(limit=1, queue=5, retry_after=1.0)
    await adm.acquire()
    a = asyncio.create_task(adm.acquire())
    b = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    a.cancel()
    await asyncio.sleep(0)
    assert adm.queued == 1
    adm.release()
    await b
    assert adm.active == 1
    adm.release()
    assert adm.active == 0


async def test_slot_handed_to_a_task_cancelled_at_that_moment_is_passed_on() -> None:
    adm = AdmissionControl(limit=1, queue=5, retry_after=1.0)
    await adm.acquire()
    a = asyncio.create_task(adm.acquire())
    b = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    adm.release()  # a's future now has its result...
    a.cancel()  # ...but a is cancelled before it runs
    await asyncio.sleep(0)
    await b
    assert adm.active == 1


def test_retry_delay_jitter_range() -> None:
    seen = {AdmissionControl(1, 0, 2.0, rng=lambda r=r: r).retry_delay() for r in (0.0, 0.3, 0.6, 0.99)}
    assert seen == {2, 3, 4}
    assert AdmissionControl(1, 0, 0.1).retry_delay() == 1


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AdmissionControl(0, 1, 1.0)
    with pytest.raises(ValueError, match="negative"):
        AdmissionControl(1, -1, 1.0)


async def test_release_without_acquire_is_a_bug() -> None:
    adm = AdmissionControl(1, 1, 1.0)
    with pytest.raises(RuntimeError):
        adm.release()
    async with adm.slot():
        assert adm.active == 1
    assert adm.active == 0


async def test_one_source_holds_at_most_per_source_slots_and_queue_places() -> None:
    adm = AdmissionControl(limit=10, queue=100, retry_after=2.0, per_source=2, queue_per_source=1)
    assert adm.try_acquire("a") and adm.try_acquire("a")
    assert not adm.try_acquire("a")  # slots are free, but not for "a"
    assert adm.try_acquire("b")
    waiting = asyncio.create_task(adm.acquire("a"))
    await asyncio.sleep(0)
    assert adm.queued == 1
    with pytest.raises(Overloaded) as refused:
        await adm.acquire("a")
    assert refused.value.reason == "per-source" and "for a" in str(refused.value)
    adm.release("a")  # "a"'s own release lets its waiter in
    await waiting
    assert adm.active_from("a") == 2 and adm.active == 3


async def test_freed_slots_go_round_robin_across_sources() -> None:
    adm = AdmissionControl(limit=1, queue=100, retry_after=2.0, per_source=1, queue_per_source=100)
    assert adm.try_acquire("a")
    order: list[str] = []

    async def worker(src: str) -> None:
        await adm.acquire(src)
        order.append(src)
        await asyncio.sleep(0)
        adm.release(src)

    tasks = [asyncio.create_task(worker(s)) for s in ("a", "a", "a", "b", "c")]
    await asyncio.sleep(0.01)
    adm.release("a")
    await asyncio.gather(*tasks)
    # "a" queued three first, yet "b" and "c" are not served after all of them.
    assert order == ["a", "b", "c", "a", "a"]
    assert adm.active == 0 and adm.queued == 0


async def test_trusted_sources_skip_the_per_source_caps_not_the_total() -> None:
    trusted = TrustedNetworks(("10.1.0.0/16",))
    adm = AdmissionControl(limit=3, queue=0, retry_after=2.0, per_source=1, queue_per_source=0, trusted=trusted)
    assert adm.try_acquire("10.1.2.3") and adm.try_acquire("10.1.2.3") and adm.try_acquire("10.1.2.3")
    assert not adm.try_acquire("10.1.2.3")
    with pytest.raises(Overloaded) as refused:
        await adm.acquire("10.1.2.3")
    assert refused.value.reason == "total"
    assert trusted("10.1.255.1") and not trusted("10.2.0.1") and not trusted("not an address")


def test_connection_limits_per_source_total_and_trusted() -> None:
    limits = ConnectionLimits(total=3, per_source=1, trusted=TrustedNetworks(("192.0.2.7",)))
    assert limits.admit("a") is None
    assert limits.admit("a") == "max-connections-per-source"
    assert limits.admit("192.0.2.7") is None and limits.admit("192.0.2.7") is None
    assert limits.admit("b") == "max-connections"
    limits.release("a")
    assert limits.admit("b") is None and limits.open == 3
