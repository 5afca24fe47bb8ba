"""What dynamic batching itself costs per request: Serve's `@serve.batch` against dlpipe's
`serving/batcher.py`, side by side in one Serve replica.

Both batch the same trivial model call (it returns its inputs), so what is timed is the
batching machinery alone: `clients` coroutines each awaiting `requests` calls in a loop,
all on the replica's event loop, max batch 32, no wait. They take turns, `--rounds` times
each; the figure is the median round's microseconds per request. Run from the repository
root (about 30 s, its own local Ray):

    python -m benchmarks.batching_overhead    # writes benchmarks/results/batching.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from benchmarks.scratch import markdown_table, write_results

RESULTS = Path("benchmarks/results/batching.json")
MAX_BATCH = 32


def build_deployment():
    from ray import serve

    from serving.batcher import DynamicBatcher

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BatchingBench:
        def __init__(self) -> None:
            self.batcher = DynamicBatcher(list, MAX_BATCH, 0.0)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)
        async def serve_batch(self, items: list[int]) -> list[int]:
            return list(items)

        async def dlpipe_batcher(self, item: int) -> int:
            return await self.batcher.submit(item)

        async def measure(self, clients: int, requests: int, rounds: int) -> dict[str, list]:
            async def one_round(call) -> float:
                async def client() -> None:
                    for i in range(requests):
                        await call(i)

                started = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(clients)))
                return (time.perf_counter() - started) / (clients * requests) * 1e6

            timings: dict[str, list] = {"serve_batch": [], "dlpipe_batcher": []}
            for _ in range(rounds):
                timings["serve_batch"].append(await one_round(self.serve_batch))
                timings["dlpipe_batcher"].append(await one_round(self.dlpipe_batcher))
            return timings

    return BatchingBench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--requests", type=int, default=200, help="per client and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(build_deployment().bind(), name="batching-bench", route_prefix=None)
        timings = handle.measure.remote(args.clients, args.requests, args.rounds).result()
    finally:
        serve.shutdown()
        ray.shutdown()
    figures = {
        name: {"us_per_request": round(statistics.median(values), 2), "rounds": values}
        for name, values in timings.items()
    }
    ratio = figures["serve_batch"]["us_per_request"] / figures["dlpipe_batcher"]["us_per_request"]
    figures["serve_batch_over_dlpipe"] = round(ratio, 1)
    rows = [
        ("`@serve.batch` (Ray Serve)", figures["serve_batch"]["us_per_request"]),
        ("`serving/batcher.py` (dlpipe)", figures["dlpipe_batcher"]["us_per_request"]),
    ]
    write_results(
        args.output,
        figures,
        markdown_table(("batching", "us per request"), rows),
        f"{args.clients} concurrent callers x {args.requests} calls, max batch {MAX_BATCH}, no "
        f"wait, a model call that returns its inputs; median of {args.rounds} rounds, the two "
        f"taking turns in one Serve replica. `@serve.batch` costs {ratio:.1f}x as much.",
    )


if __name__ == "__main__":
    main()
