"""The engine behind the HTTP server: one thread steps the `LLMEngine`; requests stream out to asyncio.

`LLMEngine` is not thread-safe, so only the engine thread touches it. Handlers on the event loop queue
their adds and aborts (and calls such as loading a LoRA adapter, `run_in_engine`); the engine thread takes
both queues at once between steps, drops every add whose abort came with it (a client that hung up while
its request was being accepted), applies the rest in order, then runs a step (continuous batching: every
running request advances one token per step) and hands each request's new output to its stream. A
request is accepted or refused by the engine thread itself (a prompt that can never fit is refused there),
so the handler knows before it answers 200.

Requests ask for DELTA outputs, and a stream holds at most one of them: what arrives before the handler
looks is merged into the one waiting, so a slow or absent reader costs the size of its output, not a copy
of it per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_ACCEPTED = object()  # first item of a stream whose request the engine took
IDLE_WAIT_S = 0.5  # how long the engine thread sleeps with nothing to do before looking again


class QueueFull(Exception):
    """The waiting queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(f"the server has {waiting} requests waiting (limit {limit}); retry after {retry_after} s")
        self.retry_after = retry_after


class EngineDead(RuntimeError):
    """The engine thread has stopped (shut down, or a step failed beyond recovery)."""


class RequestAborted(Exception):
    """The request was aborted before the engine took it (its client went away while it was being added)."""


@dataclass
class EngineStats:
    """What the engine thread has done, for /metrics."""

    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    failed_steps: int = 0
    failed_in_a_row: int = 0  # steps failed since the last one that succeeded
    # (time, generated tokens) after recent steps: tokens/s over the last few seconds
    recent: deque = field(default_factory=lambda: deque(maxlen=512))

    def tokens_per_second(self, horizon_s: float = 10.0) -> float:
        now = time.monotonic()
        points = [(t, n) for t, n in list(self.recent) if now - t <= horizon_s]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return 0.0
        return (points[-1][1] - points[0][1]) / (now - points[0][0])


class _Stream:
    """One request's items from the engine thread to its handler, in order: acceptance (or the refusal),
    outputs, maybe an error. Consecutive outputs merge into one (`RequestOutput.add`), so at most three
    items ever wait here, whatever the reader does."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: deque = deque()
        self._ready = asyncio.Event()  # set (on the loop) when an item arrives at an empty stream

    def put(self, item: Any) -> None:  # from the engine thread
        with self._lock:
            last = self._items[-1] if self._items else None
            if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
                last.add(item)
                return
            self._items.append(item)
            if last is not None:  # the reader has yet to take what is there: it will find this too
                return
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self) -> Any:
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                self._ready.clear()
            await self._ready.wait()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: Any
    params: SamplingParams
    stream: _Stream
    lora_request: LoRARequest | None = None


@dataclass(slots=True)
class _Call:
    """`fn(engine)` to run on the engine thread; its result (`_Returned`) or exception goes to `stream`."""

    fn: Callable[[LLMEngine], Any]
    stream: _Stream


@dataclass(slots=True)
class _Returned:
    value: Any


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], LLMEngine], *, max_waiting: int = 256, retry_after_s: int = 1,
                 start_timeout_s: float = 600.0):
        """Builds the engine with `make_engine()` on the engine thread, and returns once it is built (raising
        what building raised).

        The engine is built on the thread that steps it: built on one thread and stepped on another, the
        `small` preset decoded 15-25% slower here, with the process using 1.4-1.6 of 2 cores instead of 2."""
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards _adds and _aborts, which the engine thread takes together
        self._adds: deque[_Add | _Call] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self.engine: LLMEngine | None = None
        built = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(make_engine, built), name="expertmesh-engine",
                                        daemon=True)
        self._thread.start()
        if not built.wait(start_timeout_s):
            self._stop.set()
            raise TimeoutError(f"the engine was not built within {start_timeout_s} s")
        if self.engine is None:
            raise self.error if self.error is not None else RuntimeError("the engine thread stopped while building")

    # -- the event-loop side ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def num_waiting(self) -> int:
        return len(self._adds) + self.engine.scheduler.num_waiting

    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, request_id: str, prompt: Any, params: SamplingParams,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Queues a request and yields its outputs (deltas, merged while unread) until it finishes.

        Raises before the first output: `QueueFull`, `EngineDead`, or the engine's own ValueError/TypeError
        for a prompt it refuses (`AdapterSlotsFull` when its adapter finds no slot). Cancelling the consumer
        (a client gone) aborts the request and frees its cache blocks."""
        stream = await self.submit(request_id, prompt, params, lora_request)
        return self.outputs(request_id, stream)

    async def submit(self, request_id: str, prompt: Any, params: SamplingParams,
                     lora_request: LoRARequest | None = None) -> _Stream:
        if not self.alive:
            raise EngineDead(f"the engine has stopped: {self.error or 'shut down'}")
        waiting = self.num_waiting()
        if waiting >= self.max_waiting:
            raise QueueFull(waiting, self.max_waiting, self.retry_after_s)
        if isinstance(params, SamplingParams) and params.output_kind is not RequestOutputKind.DELTA:
            params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)  # what streams merge
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            self._adds.append(_Add(request_id, prompt, params, stream, lora_request))
        self._wake.set()
        try:
            first = await stream.get()
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        if first is not _ACCEPTED:
            raise first
        return stream

    async def outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # cancelled, closed early or failed: free the request's cache blocks
                self.abort(request_id)

    async def run_in_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """`fn(engine)` run on the engine thread between steps, after the adds queued before it: what it
        returns, or raises. For what must not race a step, such as loading an adapter into a slot."""
        if not self.alive:
            raise EngineDead(f"the engine has stopped: {self.error or 'shut down'}")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            self._adds.append(_Call(fn, stream))
        self._wake.set()
        item = await stream.get()
        if isinstance(item, BaseException):
            raise item
        return item.value

    def abort(self, request_id: str) -> None:
        """Aborts a request, whether the engine has taken it yet or not (an add still queued is dropped)."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops the engine thread (failing what is still streaming) and the engine's actor graph, if any."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self.engine is not None:
            self.engine.shutdown()

    # -- the engine thread -----------------------------------------------------------------------
    def _loop(self, make_engine: Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = make_engine()
        except BaseException as e:  # noqa: BLE001 - re-raised by __init__, on the caller's thread
            self.error = e
            built.set()
            return
        built.set()
        try:
            self._serve()
        except BaseException as e:  # a bug of ours: stop taking requests, tell everyone waiting why
            logger.exception("the engine thread died")
            self.error = e
            self._stop.set()
            self._fail_all(EngineDead(f"the engine thread died: {type(e).__name__}: {e}"))

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._apply_requests()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the executor gave up (recovery failed): fail what is running, go on
                logger.exception("engine step failed")
                self.stats.failed_steps += 1
                self.stats.failed_in_a_row += 1
                self._fail_all(EngineDead(f"a step failed and the requests in it were dropped: {e}"))
                continue
            self._deliver(outputs)
        self._fail_all(EngineDead("the server is shutting down"))

    def _apply_requests(self) -> None:
        """Takes the queued adds and aborts together, so that an abort queued with its own add (or before
        it) drops the add instead of missing it: applying aborts first would find no request yet, and the
        add after them would then run to max_tokens with nobody reading."""
        with self._lock:
            adds, self._adds = self._adds, deque()
            aborts, self._aborts = set(self._aborts), deque()
        for add in adds:
            if isinstance(add, _Call):
                self._call(add)
                continue
            if add.request_id in aborts:
                aborts.discard(add.request_id)
                self.stats.aborted_requests += 1
                add.stream.put(RequestAborted(f"request {add.request_id} was aborted before it started"))
                continue
            self._add(add)
        for request_id in aborts:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
                self.stats.aborted_requests += 1

    def _call(self, call: _Call) -> None:
        try:
            value = call.fn(self.engine)
        except Exception as e:  # the caller's to answer; a bug of ours is logged there, never kills the loop
            call.stream.put(e)
            return
        call.stream.put(_Returned(value))

    def _add(self, add: _Add) -> None:
        try:
            seq = self.engine.add_request(add.request_id, add.prompt, add.params, lora_request=add.lora_request)
        except (ValueError, TypeError) as e:  # the prompt or its parameters: the client's to fix
            add.stream.put(e)
            return
        except Exception as e:  # anything else is ours: say so, but keep the loop alive
            logger.exception("add_request failed")
            add.stream.put(EngineDead(f"the engine could not take the request: {e}"))
            return
        self.stats.prompt_tokens += len(seq.prompt_token_ids)
        self._streams[add.request_id] = add.stream
        add.stream.put(_ACCEPTED)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self.stats.steps += 1
        self.stats.failed_in_a_row = 0
        self.stats.generated_tokens += len(outputs)
        self.stats.recent.append((time.monotonic(), self.stats.generated_tokens))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted while the step ran
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
                self.stats.finished_requests += 1

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()
        with self._lock:
            adds, self._adds = self._adds, deque()
        for add in adds:
            add.stream.put(error)
