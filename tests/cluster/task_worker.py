"""A worker process that runs the task runner alone: ``python -m tests.cluster.task_worker URL
CREDENTIAL DATA_DIR``. It claims and runs the server's tasks as a worker's agent does, with the
node credential it is given, until SIGTERM (or SIGKILL, which is what the tests send it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import httpx

from appliance.cluster.tasks import TaskRunner
from appliance.tasks.forwarder import InferenceForwarder
from appliance.tasks.sandbox import Sandbox


async def main(url: str, credential: str, data_dir: Path) -> None:
    headers = {"authorization": f"Bearer {credential}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        runner = TaskRunner(
            client,
            data_dir=data_dir,
            sandbox=Sandbox(),
            forwarder=InferenceForwarder(url, credential=credential),
            poll_seconds=0.3,
        )
        run = asyncio.create_task(runner.run())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.cancel)
        print("ready", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await run


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
