"""The worker's task runner: the server's script and commands tasks, run in this node's sandbox.

It claims a task (``POST /api/v1/cluster/tasks/claim``) when the server wakes it (a ``tasks`` item
on the work channel: ``wake``) and every ``poll_seconds`` besides, up to ``max_running`` at once.
For each task it fetches the attachments into a fresh work dir of its own data dir, runs the job
under the same ``Sandbox`` the server uses, and meanwhile

- streams the job's output back as it comes (one NDJSON request body, reopened if it drops),
- renews the lease every third of it; a 409 means the lease is no longer this node's (the task
  was cancelled, or recovered because this node was thought dead): the job is stopped at once
  (its finish is then kept for a cancelled task, and refused for one that moved on),
- passes the job's inference calls, and its MCP calls when its task was granted tools, to the
  server through its own ``InferenceForwarder``, with the node credential and the task's id, run
  and job (the server takes that only while the task is leased here, on that attempt),

then finishes it with its state and result (``finish``; retried while the server cannot be
reached, since finishing is idempotent). Output, renew and finish carry the attempt the claim handed
out (``?attempt=N``): a late call of this job cannot touch a later attempt of the same task here.
A runner that stops (``run`` cancelled) stops its jobs and finishes none: their leases expire and
the server runs them again elsewhere.

    <data>/tasks/<id>/work/      the job's /work while it runs; removed when it ends

Imports: the sandbox, the forwarder, httpx and the standard library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import httpx

from appliance.tasks.forwarder import InferenceForwarder, JobAccess
from appliance.tasks.jobs import Job, JobResult, Limits
from appliance.tasks.output import OutputChunk
from appliance.tasks.sandbox import Sandbox

__all__ = ["CLAIM_PATH", "TaskRunner", "sandbox_capabilities"]

log = logging.getLogger(__name__)

CLAIM_PATH = "/api/v1/cluster/tasks/claim"
POLL_SECONDS = 3.0  # how often it asks for work without being woken
RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)  # between tries to finish a task when the server is away
NDJSON = "application/x-ndjson"


def sandbox_capabilities() -> dict[str, Any]:
    """The ``sandbox`` part of the node's capability report (a probe: it starts one sandbox): the
    server sends jobs only where ``available`` is true."""
    return Sandbox().capabilities().as_dict()


class TaskRunner:
    """``client`` reaches the server with the node credential (its base URL and trust set);
    ``forwarder`` passes jobs' inference calls to it (None: jobs that ask for inference fail)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        data_dir: Path,
        sandbox: Sandbox,
        forwarder: InferenceForwarder | None,
        max_running: int = 2,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.client = client
        self.root = data_dir / "tasks"
        self.sandbox = sandbox
        self.forwarder = forwarder
        self.max_running = max_running
        self.poll_seconds = poll_seconds
        self._wake: asyncio.Event | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    @classmethod
    def for_worker(
        cls,
        client: httpx.AsyncClient,
        *,
        data_dir: Path,
        server: str,
        verify: ssl.SSLContext | bool,
        credential: str,
    ) -> TaskRunner:
        """The runner of a worker's agent: jobs' inference calls go to ``server`` with the node credential."""
        forwarder = InferenceForwarder(server, verify=verify, credential=credential)
        return cls(client, data_dir=data_dir, sandbox=Sandbox(), forwarder=forwarder)

    @property
    def running(self) -> int:
        """The tasks this node runs now (counted in its heartbeat's load)."""
        return len(self._jobs)

    def wake(self) -> None:
        """A task may wait: claim now (call on the runner's event loop)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Claim and run tasks until cancelled; then stop the jobs still running, unfinished."""
        self._wake = asyncio.Event()
        try:
            while True:
                while len(self._jobs) < self.max_running:
                    task = await self._claim()
                    if task is None:
                        break
                    job = asyncio.create_task(self._run_task(task), name=f"task {task['id']}")
                    self._jobs.add(job)
                    job.add_done_callback(self._done)
                self._wake.clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self._wake.wait()
        finally:
            for job in self._jobs:
                job.cancel()
            if self._jobs:
                await asyncio.gather(*self._jobs, return_exceptions=True)

    def _done(self, job: asyncio.Task[None]) -> None:
        self._jobs.discard(job)
        if self._wake is not None:
            self._wake.set()  # a slot is free
        if not job.cancelled() and job.exception() is not None:
            log.error("a task failed on this worker", exc_info=job.exception())

    async def _claim(self) -> dict[str, Any] | None:
        try:
            response = await self.client.post(CLAIM_PATH, json={})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not claim a task: %s", exc)
            return None
        task: dict[str, Any] | None = response.json().get("task")
        return task

    # -- one task ---------------------------------------------------------------------------

    async def _run_task(self, task: dict[str, Any]) -> None:
        task_id = str(task["id"])
        base = f"/api/v1/cluster/tasks/{task_id}"
        attempt = {"attempt": int(task["attempt"])}
        task_dir = self.root / task_id
        try:
            work = await asyncio.to_thread(_fresh_work_dir, self.root, task_dir)
            for attachment in task.get("attachments", []):
                await self._fetch(f"{base}/attachments/{attachment['name']}", work / attachment["name"])
            done = await self._run_job(task, base, work, attempt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("task %s failed on this worker: %s", task_id, exc)
            await self._finish(base, attempt, "failed", {"reason": f"the worker could not run it: {exc}"})
            return
        finally:
            await asyncio.to_thread(shutil.rmtree, task_dir, True)
        # Also when the lease was lost: a cancelled task keeps what its job did; one that moved
        # on refuses it (409), and nothing changes.
        await self._finish(base, attempt, done.task_state, done.task_result())

    async def _fetch(self, path: str, target: Path) -> None:
        async with self.client.stream("GET", path) as response:
            response.raise_for_status()
            with target.open("wb") as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)

    async def _run_job(
        self, task: dict[str, Any], base: str, work: Path, attempt: dict[str, int]
    ) -> JobResult:
        task_id = str(task["id"])
        access = JobAccess(
            run_id=str(task["attempt"]), inference=bool(task.get("inference")), tools=bool(task.get("tools"))
        )
        async with AsyncExitStack() as stack:
            socket = None
            if access.routes() and self.forwarder is not None:
                socket = await stack.enter_async_context(self.forwarder.serving(task_id, access))
            job = Job(
                mode=task["mode"],
                text=task["text"],
                work_dir=work,
                limits=Limits(**task.get("limits", {})),
                env=access.env(task_id) if socket is not None else {"TASK_ID": task_id},
                inference_socket=socket,
                inference=access.inference,
            )
            call = self.sandbox.stream(job)
            stop = call.cancel  # the lease is not this node's any more
            output: asyncio.Queue[OutputChunk | None] = asyncio.Queue()
            sender = asyncio.create_task(self._send_output(base, attempt, output, stop))
            renewer = asyncio.create_task(self._renew(base, attempt, float(task["lease_seconds"]), stop))
            try:
                async for chunk in call:
                    output.put_nowait(chunk)
                done = await call.result()
            finally:
                call.cancel()
                output.put_nowait(None)
                renewer.cancel()
                with suppress(asyncio.CancelledError):
                    await renewer
                await sender
        return done

    async def _send_output(
        self,
        base: str,
        attempt: dict[str, int],
        output: asyncio.Queue[OutputChunk | None],
        stop: Callable[[], None],
    ) -> None:
        """Stream the job's output; a request that drops is opened again for what comes next."""
        ended = False

        async def lines() -> AsyncIterator[bytes]:
            nonlocal ended
            while (chunk := await output.get()) is not None:
                yield json.dumps({"stream": chunk.stream, "text": chunk.text}).encode() + b"\n"
            ended = True

        while not ended:
            try:
                response = await self.client.post(
                    f"{base}/output",
                    params=attempt,
                    content=lines(),
                    headers={"content-type": NDJSON},
                    timeout=httpx.Timeout(10.0, read=None, write=None),
                )
            except httpx.HTTPError as exc:
                log.warning("output of %s dropped: %s", base, exc)
                await asyncio.sleep(RETRY_SECONDS[0])
                continue
            if response.status_code in (403, 404, 409):
                stop()
                while not ended and await output.get() is not None:
                    pass  # drain: the job is stopping
                return
            if response.is_error:
                log.warning("output of %s refused: %s %s", base, response.status_code, response.text)

    async def _renew(
        self, base: str, attempt: dict[str, int], lease_seconds: float, stop: Callable[[], None]
    ) -> None:
        while True:
            await asyncio.sleep(lease_seconds / 3)
            try:
                response = await self.client.post(f"{base}/renew", params=attempt, json={})
            except httpx.HTTPError as exc:  # the next round tries again, within the lease
                log.warning("could not renew %s: %s", base, exc)
                continue
            if response.status_code in (403, 404, 409):
                log.info("%s: the lease is no longer this node's; stopping its job", base)
                stop()
                return

    async def _finish(self, base: str, attempt: dict[str, int], state: str, result: dict[str, Any]) -> None:
        for pause in (*RETRY_SECONDS, None):
            try:
                response = await self.client.post(
                    f"{base}/finish", params=attempt, json={"state": state, "result": result}
                )
            except httpx.HTTPError as exc:
                log.warning("could not finish %s: %s", base, exc)
            else:
                if response.is_error:
                    log.warning("%s: finish refused: %s %s", base, response.status_code, response.text)
                return
            if pause is None:
                return
            await asyncio.sleep(pause)


def _fresh_work_dir(root: Path, task_dir: Path) -> Path:
    # As root, jobs run as nobody, who must pass through these on the way to the work dir.
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    root.chmod(0o711)
    shutil.rmtree(task_dir, ignore_errors=True)
    work = task_dir / "work"
    work.mkdir(mode=0o711, parents=True)
    task_dir.chmod(0o711)
    return work
