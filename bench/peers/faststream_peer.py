"""FastStream (RabbitMQ / aio-pika) end-to-end throughput peer.

Measures msg/s from the first publish to the N-th consumed-and-acked message:
- fresh durable classic queue with a unique name, one subscriber on its own
  channel with prefetch (basic.qos) 100, default ack policy (ack after the
  handler returns);
- N persistent messages (delivery_mode 2) of B raw bytes published to the
  default exchange, with publisher confirms (FastStream's Channel defaults to
  publisher_confirms=True; aio-pika awaits the broker's Basic.Ack),
  at most 1,000 publishes in flight (semaphore-bounded asyncio tasks).
Plain asyncio (FastStream only picks uvloop in its `faststream run` CLI, and
only if installed). Per-message FastStream logging is off (logger=None).
Prints one line: `faststream.end_to_end <msg/s> msg/s`.
"""

import argparse
import asyncio
import sys
import time
import uuid

from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

IN_FLIGHT = 1000
PREFETCH = 100


async def run(address: str, count: int, body_size: int) -> float:
    broker = RabbitBroker(address, logger=None)
    queue = RabbitQueue(f"faststream-bench-{uuid.uuid4()}", durable=True)
    received = 0
    done = asyncio.Event()

    subscriber = broker.subscriber(queue, channel=Channel(prefetch_count=PREFETCH))

    @subscriber
    async def handle(body: bytes) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    body = b"x" * body_size
    sem = asyncio.Semaphore(IN_FLIGHT)
    errors: list[BaseException] = []
    tasks: set[asyncio.Task] = set()

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        sem.release()
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())

    await broker.start()  # connects, declares the queue, starts consuming
    try:
        start = time.perf_counter()
        for _ in range(count):
            await sem.acquire()
            if errors:
                raise errors[0]
            task = asyncio.create_task(broker.publish(body, queue=queue, persist=True))
            tasks.add(task)
            task.add_done_callback(finished)
        if tasks:
            await asyncio.gather(*tasks)
        if errors:
            raise errors[0]
        await done.wait()
        return count / (time.perf_counter() - start)
    finally:
        for task in tasks:
            task.cancel()
        try:
            await subscriber.stop()  # cancel the consumer, then delete the queue
            q = await broker.declare_queue(queue)
            await q.delete(if_unused=False, if_empty=False)
        finally:
            await broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--body-size", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0, help="overall seconds")
    a = p.parse_args()
    try:
        rate = asyncio.run(
            asyncio.wait_for(run(a.address, a.count, a.body_size), a.timeout)
        )
    except asyncio.TimeoutError:
        print(f"faststream peer failed: timed out after {a.timeout}s", file=sys.stderr)
        return 1
    except BaseException as e:  # noqa: BLE001 - report anything, exit non-zero
        print(f"faststream peer failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"faststream.end_to_end {rate:.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
