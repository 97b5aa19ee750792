"""The footprint benchmark's baseline: the smallest aiomqtt + psutil agent that does the job.

Connects, publishes a retained birth and a metrics sample every ``interval`` seconds, and
listens on a command topic; no settings, signing, journal or CLI. Issue 5 quotes such an
agent at 27 MiB beside a 22 MiB bare interpreter on its machine; measured here in the same
run as the real agent, it shows what mqfleet's own code costs on top.

    python bench/minimal_agent.py PORT [INTERVAL]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiomqtt
import psutil


async def main(port: int, interval: float) -> None:
    """Publish status + metrics forever; drain the command topic."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="minimal-agent") as client:
        await client.subscribe("minimal/commands", qos=1)
        await client.publish("minimal/status", b'{"status":"online"}', qos=1, retain=True)
        psutil.cpu_percent()
        while True:
            sample = {
                "ts": time.time(),
                "cpu_usage": psutil.cpu_percent(),
                "memory_usage": psutil.virtual_memory().percent,
                "disk_usage": psutil.disk_usage("/").percent,
                "load_average": psutil.getloadavg()[0],
            }
            await client.publish("minimal/metrics", json.dumps(sample).encode(), qos=1)
            await asyncio.sleep(interval)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 10.0))
