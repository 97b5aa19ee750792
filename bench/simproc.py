"""A simulated fleet in its own process, steered over stdin, with a ledger at the end.

Used by the scale, fan-out and soak benchmarks. ``mqfleet simulate`` is the product's
command; this wrapper adds what a benchmark needs to reconcile: the exact samples each
node numbered (node -> session -> count) written as JSON when it stops.

stdin commands, one per line: ``drop K`` (break K random connections without a
DISCONNECT, so the broker publishes their Will), ``stats`` (one JSON line on stdout),
``stop`` (wait until every sample is acknowledged, then leave cleanly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

from mqfleet.settings import load_settings
from mqfleet.simulator import Fleet

DRAIN_TIMEOUT_S = 120.0


async def main() -> None:
    """Run the fleet, obey stdin until ``stop``, drain, then write the ledger."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--prefix", default="sim-")
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--keepalive", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    settings = load_settings(broker_url=args.broker, keepalive_s=args.keepalive)
    fleet = Fleet(
        settings, nodes=args.nodes, interval_s=args.interval, prefix=args.prefix, seed=args.seed
    )
    rng = random.Random(args.seed)  # noqa: S311 - picks nodes to disconnect
    task = asyncio.create_task(fleet.run(), name="fleet")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not task.done():
        line = (await reader.readline()).decode().strip()
        if not line or line == "stop":
            break
        word, _, arg = line.partition(" ")
        if word == "drop":
            victims = rng.sample(fleet.nodes, min(int(arg or 1), len(fleet.nodes)))
            for node in victims:
                node.drop()
        elif word == "stats":
            stats = asdict(fleet.stats) | {"unacked": fleet.unacked()}
            print(json.dumps(stats), flush=True)
    # Every sample must reach the broker before we leave: paho resends after reconnects.
    # Polled: the acknowledgements and connections live in paho's threads, with no event.
    deadline = loop.time() + DRAIN_TIMEOUT_S
    while loop.time() < deadline:
        if task.done() or not (fleet.unacked() or fleet.stats.connected < len(fleet.nodes)):
            break
        await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    ledger = {
        "stats": asdict(fleet.stats) | {"unacked": fleet.unacked()},
        "sessions": {k: {str(s): n for s, n in v.items()} for k, v in fleet.ledger().items()},
    }
    args.ledger.write_text(json.dumps(ledger))
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
