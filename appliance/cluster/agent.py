"""The worker: a node that opens every connection to its server and runs the work it is handed.

    worker.json (0600)  server URL, node id and name, node credential, the pinned CA
    worker-models.json  digest -> model name of the blobs it fetched (to report them after a restart)

    heartbeat   POST /api/v1/cluster/heartbeat every heartbeat_interval (and at once on a change):
                capabilities when they changed, load, availability, the config version applied;
                the reply may carry a newer config -> reconcile
    work        GET /api/v1/cluster/work?wait=25, a long poll held open; on failure it retries
                after 0.5 s, 1 s, 2 s ... 10 s (reset by a success); a 401 means the credential
                was revoked: the agent stops with that message
    reconcile   per config entry: fetch the blob if missing (fetch.py), load it (kept loaded),
                reporting loading -> available or failed; unload what left the config; then ack
    execute     generate / embed on the worker's own EnginePool; the events go back as one
                streaming NDJSON request body (POST /api/v1/cluster/work/{id}/events) while the
                engine produces them; a cancel item ends the generation with a cancelled line

The server never dials a worker, so a worker behind NAT or a one-way firewall works. Every JSON
shape is ``wire.py``'s. Imports: errors, settings, hostinfo, client (the pinned trust),
engine (base, pool), store.cache, provision.transfer (through fetch.py); never the registry,
the store's database or the web layer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx

from appliance import __version__, hostinfo
from appliance.client import pinned_trust, write_private
from appliance.cluster.fetch import BlobFetcher
from appliance.cluster.tasks import TaskRunner, sandbox_capabilities
from appliance.cluster.wire import (
    decode_prompt,
    decode_spec,
    encode_embeddings,
    encode_event,
)
from appliance.engine.base import Finished
from appliance.engine.pool import EnginePool
from appliance.errors import ApplianceError, EngineFailure, InvalidSetting, Unauthorized
from appliance.settings import Settings
from appliance.store.cache import BlobCache

__all__ = ["WORKER_FILE", "Agent", "Backoff", "WorkerConfig", "capabilities", "problem_detail"]

WORKER_FILE = "worker.json"
MODELS_FILE = "worker-models.json"
POLL_WAIT = 25.0  # seconds the server holds a work poll open (the contract allows up to 30)
FIRST_RETRY = 0.5
LAST_RETRY = 10.0
LOW_DISK = 0.10  # crossing 10% free disk is a capability change the server hears about at once
NDJSON = "application/x-ndjson"

Log = Callable[[str], None]


@dataclass(frozen=True)
class WorkerConfig:
    """``worker.json``: what a join gave this data dir; ``worker run`` starts from it."""

    server: str  # scheme://host:port
    node_id: str
    name: str
    credential: str  # apnode_…, as the server returned it once
    fingerprint: str | None = None  # "sha256:HEX" of the pinned CA; None: plain HTTP
    ca_pem: str | None = None

    @staticmethod
    def path(data_dir: Path) -> Path:
        return data_dir / WORKER_FILE

    @classmethod
    def read(cls, data_dir: Path) -> WorkerConfig | None:
        path = cls.path(data_dir)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidSetting(
                f"{path} is not a worker file `appliance worker join` wrote: {exc}",
                hint=f"delete it and join again with a new token: rm {path}",
            ) from exc

    def write(self, data_dir: Path) -> None:
        """0600 from birth, through a temporary file and a rename: never half a file."""
        write_private(
            self.path(data_dir),
            json.dumps(asdict(self), indent=2),
            what="the worker file",
            hint="check that the data dir is writable",
        )

    def trust(self) -> ssl.SSLContext | bool:
        """An https server is trusted through the pinned CA only."""
        return pinned_trust(self.ca_pem) if self.ca_pem else True


def capabilities(data_dir: Path, memory_budget: int) -> dict[str, Any]:
    """What the server places work by (blocking: it asks nvidia-smi and llama.cpp)."""
    facts = hostinfo.report(data_dir)
    return {
        "cpu": {"count": facts["cpu_count"], "load_average": facts["load_average"]},
        "memory": facts["memory"],
        "gpus": facts["gpus"],
        "disk_free_bytes": facts["disk_free_bytes"],
        "engine": {
            "build": {
                "llama_cpp_version": facts["llama_cpp_version"],
                "gpu_backends": facts["gpu_backends"],
                "devices": facts["devices"],
            },
            "gpu_offload": facts["gpu_offload"],
        },
        "memory_budget": memory_budget,
        "version": __version__,
        "sandbox": sandbox_capabilities(),  # whether the server's script and commands tasks may come here
    }


def _change_marks(data_dir: Path, memory_budget: int) -> tuple[Any, ...]:
    """The capabilities whose change is reported at once: GPUs, the disk crossing 10% free, the
    memory budget (cheap to read on every heartbeat, unlike the whole report)."""
    usage = shutil.disk_usage(data_dir)
    gpus = tuple((gpu.name, gpu.vram_total_bytes) for gpu in hostinfo.gpus())
    return gpus, usage.free < usage.total * LOW_DISK, memory_budget


class Backoff:
    """0.5 s, 1 s, 2 s ... at most 10 s between tries; ``reset`` after a success."""

    def __init__(self, first: float = FIRST_RETRY, most: float = LAST_RETRY) -> None:
        self.first = first
        self.most = most
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.most)
        return delay

    def reset(self) -> None:
        self._next = self.first


class _Unreachable(Exception):
    """The server did not answer, or answered with an error worth retrying."""


@dataclass
class _Availability:
    model: str
    state: str  # loading, available, failed (cached is derived from the disk)
    reason: str | None = None


class _Stopped(Exception):
    pass


class Agent:
    """The worker's loops (see the module docstring). ``run`` returns when ``stop`` is called and
    raises Unauthorized when the server revoked the node's credential."""

    def __init__(
        self,
        config: WorkerConfig,
        settings: Settings,
        *,
        log: Log,
        pool: EnginePool | None = None,
        heartbeat_interval: float = 3.0,
        transport: httpx.AsyncBaseTransport | None = None,
        blob_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.data_dir = settings.data_dir
        self.log = log
        self.cache = BlobCache(settings.data_dir)
        self._own_pool = pool is None
        self.pool = pool or EnginePool(settings.engine)
        self.fetcher = BlobFetcher(
            config.server,
            config.credential,
            self.cache,
            settings.models.download,
            verify=config.trust(),
            transport=blob_transport,
        )
        self.heartbeat_interval = heartbeat_interval
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.tasks: TaskRunner | None = None  # the server's script and commands tasks, while running
        self._stop = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._config_waiting = asyncio.Event()
        self._pending: tuple[str, dict[str, Any]] | None = None  # a newer config to apply
        self._applying: str | None = None
        self._malformed: str | None = None
        self.config_applied: str | None = None
        self._sent_marks: tuple[Any, ...] | None = None  # the change marks the server last heard
        self._states: dict[str, _Availability] = {}  # digest -> state of a config entry
        self._config_keys: dict[str, str] = {}  # digest -> the key it was loaded under
        self._names = self._read_names()
        self._fetches: dict[str, asyncio.Lock] = {}
        self._work: dict[str, asyncio.Task[None]] = {}  # work id -> what produces its events
        self._connected: bool | None = None
        self._drained = False
        self._beat_failing = False

    # -- running ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self.fetcher.cancel.set()

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.config.credential}"}
        try:
            async with httpx.AsyncClient(
                base_url=self.config.server,
                headers=headers,
                verify=self.config.trust(),
                transport=self._transport,
                trust_env=False,
                timeout=httpx.Timeout(30.0),
            ) as client:
                self._client = client
                self.tasks = TaskRunner.for_worker(
                    client,
                    data_dir=self.data_dir,
                    server=self.config.server,
                    verify=self.config.trust(),
                    credential=self.config.credential,
                )
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self.tasks.run())
                        group.create_task(self._heartbeats())
                        group.create_task(self._poll_work(group))
                        group.create_task(self._reconciles())
                        group.create_task(self._until_stopped())
                except* _Stopped:
                    pass
                except* Unauthorized as revoked:
                    raise revoked.exceptions[0] from None
        finally:
            self._client = None
            if self._own_pool:
                await anyio.to_thread.run_sync(self.pool.close)

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        raise _Stopped

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON answer; a 401 is the revoked credential, what is worth retrying is _Unreachable."""
        assert self._client is not None
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        if response.status_code == 401:
            raise self._revoked(response)
        if response.is_error:
            raise _Unreachable(f"{method} {path} answered {response.status_code}: {problem_detail(response)}")
        try:
            body = response.json()
        except ValueError as exc:
            raise _Unreachable(f"{method} {path} answered with no JSON: {exc}") from exc
        if not isinstance(body, dict):  # every node route answers an object
            raise _Unreachable(f"{method} {path} answered {type(body).__name__}, not a JSON object")
        return body

    def _revoked(self, response: httpx.Response) -> Unauthorized:
        worker_file = WorkerConfig.path(self.data_dir)
        return Unauthorized(
            f"the server at {self.config.server} no longer accepts this node's credential (node"
            f" {self.config.name}, {self.config.node_id}): it was removed there ({problem_detail(response)})",
            hint=f"to join again, delete {worker_file} and run `appliance worker join URL --token T`"
            " with a new token (the cached blobs stay)",
        )

    def _reached(self) -> None:
        if not self._connected:
            self.log(f"connected to {self.config.server} as {self.config.name}")
        self._connected = True

    def _lost(self, why: str, retry_in: float) -> None:
        """Said once per outage, not on every try."""
        if self._connected is not False:
            what = "lost connection to" if self._connected else "cannot reach"
            self.log(f"{what} {self.config.server} ({why}); retrying in {retry_in:.1f} s")
        self._connected = False

    # -- heartbeat -------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except _Unreachable as exc:
                if not self._beat_failing:  # the work poll says whether the server is reachable
                    self.log(
                        f"a heartbeat failed ({exc}); trying again every {self.heartbeat_interval:.1f} s"
                    )
                self._beat_failing = True
            with suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._beat_now.wait()
            self._beat_now.clear()

    async def heartbeat(self) -> dict[str, Any]:
        marks = await anyio.to_thread.run_sync(_change_marks, self.data_dir, self.pool.memory_budget)
        caps = None
        if marks != self._sent_marks:
            caps = await anyio.to_thread.run_sync(capabilities, self.data_dir, self.pool.memory_budget)
        body = {
            "capabilities": caps,
            "load": self.load(),
            "models": self.availability(),
            "config_applied": self.config_applied,
        }
        reply: dict[str, Any] = await self._call("POST", "/api/v1/cluster/heartbeat", json=body)
        if self._beat_failing:
            self.log("heartbeats go through again")
        self._beat_failing = False
        self._sent_marks = marks
        self.heartbeat_interval = float(reply.get("heartbeat_interval") or self.heartbeat_interval)
        drained = bool(reply.get("drained"))
        if drained != self._drained:
            self.log("drained: the server sends this node no new work" if drained else "undrained")
            self._drained = drained
        version, config = reply.get("config_version"), reply.get("config")
        if config is not None and isinstance(version, str):
            self._offer(version, config)
        return reply

    def _offer(self, version: str, config: dict[str, Any]) -> None:
        """Queue a config newer than any applied or being applied (ULIDs sort by time)."""
        newest = max(v for v in (self.config_applied, self._applying, self._malformed, "") if v is not None)
        pending = self._pending[0] if self._pending else ""
        if version > newest and version > pending:
            self._pending = (version, config)
            self._config_waiting.set()

    def load(self) -> dict[str, Any]:
        loaded = self.pool.loaded()
        return {
            # routing weighs this: the server's tasks running here count as much as its requests
            "active": len(self._work) + (self.tasks.running if self.tasks is not None else 0),
            "queued": sum(info.queued_requests for info in loaded),
            "loaded": sorted({info.digest for info in loaded}),
        }

    def availability(self) -> list[dict[str, Any]]:
        """Every cached or loaded digest, and the config entries still loading or failed."""
        loaded = {info.digest: info.key for info in self.pool.loaded()}
        listed: dict[str, dict[str, Any]] = {}
        for digest in self.cache.blob_files():
            listed[digest] = {"digest": digest, "model": self._names.get(digest, ""), "state": "cached"}
        for digest, key in loaded.items():
            listed[digest] = {"digest": digest, "model": self._names.get(digest, key), "state": "available"}
        for digest, entry in self._states.items():
            state = entry.state
            if state == "available" and digest not in loaded:  # unloaded since (memory was needed)
                state = "cached" if digest in listed else "failed"
            listed[digest] = {"digest": digest, "model": entry.model, "state": state, "reason": entry.reason}
        report = []
        for _, item in sorted(listed.items()):
            reason = item.get("reason")  # within what the server takes of each
            report.append({**item, "model": item["model"][:300], "reason": reason and reason[:4000]})
        return report

    # -- config ----------------------------------------------------------------------------------

    async def _reconciles(self) -> None:
        while True:
            await self._config_waiting.wait()
            self._config_waiting.clear()
            if self._pending is None:
                continue
            (version, config), self._pending = self._pending, None
            self._applying = version
            try:
                await self.reconcile(config)
            except (KeyError, TypeError, AttributeError) as exc:  # not acked: a newer config may mend it
                self.log(f"config {version} not applied: it is malformed ({type(exc).__name__}: {exc})")
                self._malformed = version  # not tried again on every heartbeat
                continue
            finally:
                self._applying = None
            self.config_applied = version
            self._beat_now.set()

    async def reconcile(self, config: dict[str, Any]) -> None:
        """Make the loaded models what ``config`` lists: fetch, load, report; unload the rest."""
        entries = {entry["digest"]: entry for entry in config.get("models", [])}
        for digest in [digest for digest in self._states if digest not in entries]:
            model = self._states.pop(digest).model
            key = self._config_keys.pop(digest, None)
            if key is not None and await anyio.to_thread.run_sync(self.pool.unload, key):
                self.log(f"unloaded {model} (no longer in this node's config; its blob stays cached)")
        for digest, entry in entries.items():
            model = str(entry.get("model") or digest)
            current = self._states.get(digest)
            if current is not None and current.state == "available" and self._is_loaded(digest):
                continue
            self._set(digest, model, "loading")
            self.log(f"loading {model}")
            try:
                path = await self.ensure_blob(digest, model)
                spec = decode_spec(entry["spec"], path)
                await anyio.to_thread.run_sync(partial(self.pool.load, spec, keep_alive=-1))
            except Exception as exc:  # any failure is this entry's: the others still load
                reason = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
                self._set(digest, model, "failed", reason)
                self.log(f"{model} failed: {reason}")
                continue
            self._config_keys[digest] = spec.key
            self._set(digest, model, "available")
            self.log(f"{model} available")

    def _is_loaded(self, digest: str) -> bool:
        return any(info.digest == digest for info in self.pool.loaded())

    def _set(self, digest: str, model: str, state: str, reason: str | None = None) -> None:
        self._states[digest] = _Availability(model, state, reason)
        self._beat_now.set()  # the server hears of each step at once, not a heartbeat later

    async def ensure_blob(self, digest: str, model: str | None = None) -> Path:
        """The blob in this worker's cache, fetched from the server first when it is missing (one
        fetch per digest however many ask)."""
        lock = self._fetches.setdefault(digest, asyncio.Lock())
        async with lock:
            if not self.cache.has(digest):
                self.log(f"fetching {model or digest} from {self.config.server}")
            path = await anyio.to_thread.run_sync(self.fetcher.fetch, digest)
        if model and self._names.get(digest) != model:
            self._names[digest] = model
            write_private(
                self.data_dir / MODELS_FILE,
                json.dumps(self._names, indent=2, sort_keys=True),
                what="the worker's model names",
                hint="check that the data dir is writable",
            )
        return path

    def _read_names(self) -> dict[str, str]:
        try:
            names = json.loads((self.data_dir / MODELS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {str(key): str(value) for key, value in names.items()} if isinstance(names, dict) else {}

    # -- work ------------------------------------------------------------------------------------

    async def _poll_work(self, group: asyncio.TaskGroup) -> None:
        backoff = Backoff()
        while True:
            try:
                reply = await self._call(
                    "GET",
                    "/api/v1/cluster/work",
                    params={"wait": POLL_WAIT},
                    timeout=httpx.Timeout(30.0, read=POLL_WAIT + 15),
                )
            except _Unreachable as exc:
                delay = backoff.next()
                self._lost(str(exc), delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._reached()
            for item in reply.get("items", []):
                if isinstance(item, dict):
                    self._dispatch(item, group)

    def _dispatch(self, item: dict[str, Any], group: asyncio.TaskGroup) -> None:
        kind, work_id = item.get("kind"), str(item.get("id"))
        if kind == "config":
            self._beat_now.set()  # the heartbeat's reply carries the config
        elif kind == "tasks" and self.tasks is not None:
            self.tasks.wake()  # a task was queued: claim it now
        elif kind == "cancel":
            producer = self._work.get(str(item.get("work")))
            if producer is not None:
                producer.cancel()
        elif kind in ("generate", "embed"):
            lines = self._generate(item) if kind == "generate" else self._embed(item)
            group.create_task(self._answer(work_id, lines))
        else:
            self.log(f"ignored work {work_id} of unknown kind {kind!r}")

    async def _answer(self, work_id: str, lines: AsyncGenerator[dict[str, Any]]) -> None:
        """Stream ``lines`` as one request body while they are produced. A cancel item cancels the
        producer: a cancelled line ends the body and the request completes as usual."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def produce() -> None:
            try:
                async with aclosing(lines):
                    async for line in lines:
                        queue.put_nowait(_ndjson(line))
            except asyncio.CancelledError:
                queue.put_nowait(_ndjson(encode_event(Finished("cancelled", 0, 0))))
                raise
            finally:
                queue.put_nowait(None)

        async def body() -> AsyncIterator[bytes]:
            while (line := await queue.get()) is not None:
                yield line

        producer = self._work[work_id] = asyncio.create_task(produce())
        try:
            reply = await self._call(
                "POST",
                f"/api/v1/cluster/work/{work_id}/events",
                content=body(),
                headers={"Content-Type": NDJSON},
                timeout=httpx.Timeout(30.0, read=60.0, write=60.0),
            )
        except (_Unreachable, Unauthorized) as exc:
            self.log(f"work {work_id}: its events did not reach the server ({exc})")
            return
        finally:  # the request ended (or failed) first: nobody reads what the engine would make
            producer.cancel()
            self._work.pop(work_id, None)
        if reply.get("state") == "cancelled":
            self.log(f"work {work_id}: the client went away")

    async def _generate(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        try:
            spec_data, prompt = item["spec"], decode_prompt(item["prompt"])
            path = await self.ensure_blob(str(spec_data["digest"]))
            spec = decode_spec(spec_data, path)
            async with aclosing(self.pool.generate(spec, prompt)) as events:
                async for event in events:
                    yield encode_event(event)
        except Exception as exc:  # the client gets the worker's own error, as the last line
            yield encode_event(Finished("error", 0, 0, error=_as_error(exc)))

    async def _embed(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        try:
            spec_data, texts = item["spec"], [str(text) for text in item["texts"]]
            path = await self.ensure_blob(str(spec_data["digest"]))
            result = await self.pool.embed(
                decode_spec(spec_data, path),
                texts,
                keep_alive=item.get("keep_alive"),
                truncate=bool(item.get("truncate")),
            )
        except Exception as exc:
            yield encode_event(Finished("error", 0, 0, error=_as_error(exc)))
            return
        yield encode_embeddings(result)


def _as_error(exc: Exception) -> ApplianceError:
    if isinstance(exc, ApplianceError):
        return exc
    if isinstance(exc, (KeyError, TypeError, ValueError)):
        return EngineFailure(f"the work item was malformed: {type(exc).__name__}: {exc}")
    return EngineFailure(f"{type(exc).__name__}: {exc}")


def _ndjson(line: dict[str, Any]) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def problem_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("message") or body)
    return str(body)
