"""serving/batcher.py: concurrent calls answered together, each with its own result."""

from __future__ import annotations

import asyncio

import pytest

from serving.batcher import DynamicBatcher


class Doubler:
    """run_batch that doubles numbers, fails on "bad" items alone, and records its batches."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if "boom" in items:
            raise RuntimeError("the model call failed")
        return [ValueError(f"bad item {i}") if i == "bad" else i * 2 for i in items]


def run(coroutine):
    return asyncio.run(coroutine)


def submit_all(batcher: DynamicBatcher, items) -> list:
    """Submit every item at once, as concurrent clients would; their answers in order."""

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in items))

    return run(main())


def test_concurrent_calls_share_a_batch_and_get_their_own_results() -> None:
    model = Doubler()
    assert submit_all(DynamicBatcher(model, max_batch_size=32), range(10)) == [
        i * 2 for i in range(10)
    ]
    assert model.batches == [list(range(10))]


def test_batches_never_exceed_max_batch_size() -> None:
    model = Doubler()
    assert submit_all(DynamicBatcher(model, max_batch_size=4), range(10)) == [
        i * 2 for i in range(10)
    ]
    assert [len(b) for b in model.batches] == [4, 4, 2]


def test_a_batch_is_counted_in_model_inputs() -> None:
    """Requests of 3, 3, 2, 5 and 1 inputs with max_batch_size 6: batches of (3, 3), (2),
    (5, 1); a request larger than the limit runs alone, and answers stay in order."""
    model = Doubler()
    batcher = DynamicBatcher(model, max_batch_size=6)
    sizes = [3, 3, 2, 5, 1, 9]

    async def main():
        return await asyncio.gather(*(batcher.submit(i, size) for i, size in enumerate(sizes)))

    assert run(main()) == [i * 2 for i in range(len(sizes))]
    assert model.batches == [[0, 1], [2], [3, 4], [5]]


def test_a_bad_item_fails_only_its_own_caller() -> None:
    batcher = DynamicBatcher(Doubler())

    async def main():
        return await asyncio.gather(
            batcher.submit(1), batcher.submit("bad"), batcher.submit(3), return_exceptions=True
        )

    first, bad, third = run(main())
    assert (first, third) == (2, 6)
    assert isinstance(bad, ValueError) and "bad item" in str(bad)


def test_a_failed_model_call_reaches_every_caller_and_the_batcher_goes_on() -> None:
    batcher = DynamicBatcher(Doubler())

    async def main():
        failed = await asyncio.gather(
            batcher.submit(1), batcher.submit("boom"), return_exceptions=True
        )
        return failed, await batcher.submit(5)

    failed, after = run(main())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert after == 10


def test_wait_timeout_gathers_callers_arriving_apart() -> None:
    model = Doubler()
    batcher = DynamicBatcher(model, max_batch_size=8, batch_wait_timeout_s=0.2)

    async def late(i: int):
        await asyncio.sleep(0.02 * i)
        return await batcher.submit(i)

    async def main():
        return await asyncio.gather(*(late(i) for i in range(4)))

    assert run(main()) == [0, 2, 4, 6]
    assert model.batches == [[0, 1, 2, 3]]


def test_no_wait_still_takes_callers_of_the_next_loop_turn() -> None:
    """Without a wait timer, the batch is taken one turn of the event loop after the first
    caller: a caller whose request was read in that turn (over HTTP: bytes that came while
    the last batch ran) shares its batch."""
    model = Doubler()
    batcher = DynamicBatcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)

    async def next_turn(i: int):
        await asyncio.sleep(0)
        return await batcher.submit(i)

    async def main():
        return await asyncio.gather(batcher.submit(1), next_turn(2))

    assert run(main()) == [2, 4]
    assert model.batches == [[1, 2]]


def test_no_wait_answers_a_lone_caller_at_once() -> None:
    batcher = DynamicBatcher(Doubler(), batch_wait_timeout_s=0.0)

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await batcher.submit(21)
        return result, loop.time() - started

    result, seconds = run(main())
    assert result == 42 and seconds < 0.05


def test_a_caller_that_gave_up_is_left_out_of_the_batch() -> None:
    model = Doubler()
    batcher = DynamicBatcher(model, max_batch_size=8, batch_wait_timeout_s=0.1)

    async def main():
        impatient = asyncio.create_task(batcher.submit(1))
        patient = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.01)
        impatient.cancel()
        return await patient

    assert run(main()) == 4
    assert model.batches == [[2]]


def test_limits_change_live_and_are_checked() -> None:
    model = Doubler()
    batcher = DynamicBatcher(model, max_batch_size=8)
    batcher.configure(max_batch_size=2, batch_wait_timeout_s=0.0)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(4)))

    run(main())
    assert [len(b) for b in model.batches] == [2, 2]
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        batcher.configure(max_batch_size=0, batch_wait_timeout_s=0.0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s >= 0"):
        batcher.configure(max_batch_size=4, batch_wait_timeout_s=-1)


def test_a_request_queued_past_its_timeout_is_not_run_and_hears_timeout() -> None:
    """A slow batch holds the loop; the requests that queued behind it for longer than
    timeout_s get TimeoutError (the app's 504) and never reach the model, the next get their
    answers."""
    import time

    class Slow(Doubler):
        def __call__(self, items: list) -> list:
            if 0 in items:
                time.sleep(0.2)  # one batch longer than the timeout, the loop held
            return super().__call__(items)

    model = Slow()
    batcher = DynamicBatcher(model, max_batch_size=1, timeout_s=0.1)

    async def main():
        # All three queue at once; the first batch then holds the loop for 0.2 s.
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(3)), return_exceptions=True
        )
        return results, await batcher.submit(3)

    (first, *late), after = run(main())
    assert first == 0 and after == 6
    assert all(isinstance(result, TimeoutError) for result in late)
    assert [batch for batch in model.batches] == [[0], [3]]
