"""The engine on a thread of its own, for asyncio servers.

:class:`LLMEngine` is not thread-safe, so one thread owns it. Everything else talks to that thread through a
command queue (``add`` / ``abort`` / ``stop``) and gets each request's outputs back on an ``asyncio.Queue`` of the
event loop that submitted it. The thread drains the commands between steps, so requests join the running batch
between two decode steps and leave it the step they finish (or the moment they are aborted: the engine frees
their cache row at once); every step decodes the whole running batch in one forward. Continuous batching is
therefore simply what the loop does. After each step the thread runs the output processor
(qwen2vl.engine.output_processor: ids to text deltas, stop strings), as ``LLM`` does.

    engine = AsyncEngine(llm.engine); engine.start()
    handle = engine.submit([Sequence(ids, params, vision)])      # from a coroutine
    async for index, out in handle: ...                           # RequestOutputs, the last one finished
    engine.abort(handle)                                          # e.g. the client went away
    engine.shutdown()

A request that makes the model fail (an exception inside ``step``) ends with :class:`EngineError` on its handle;
the requests beside it go on. If the failing request cannot be told apart, every request in flight is ended with
the error, so that a broken step can never spin forever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from ..errors import InvalidInputError
from ..memory import IdleTrimmer
from .llm_engine import LLMEngine
from .output_processor import OutputProcessor, merge_outputs
from .sequence import RequestOutput, Sequence

__all__ = ["AsyncEngine", "EngineError", "RequestHandle"]

log = logging.getLogger("qwen2vl.engine")


class EngineError(RuntimeError):
    """A request could not be completed by the engine (model failure, shutdown)."""


class RequestHandle:
    """The outputs of one submitted group of sequences (one request, ``n`` completions), as ``(index, output)``
    pairs in the order they were produced. Iteration ends after every sequence has given a finished output;
    it raises :class:`~qwen2vl.errors.InvalidInputError` or :class:`EngineError` if the engine refused or lost
    the request.

    Outputs a slow consumer has not taken yet are merged (:func:`~qwen2vl.engine.output_processor.merge_outputs`),
    so a client that reads slowly costs one pending output per sequence, however far the engine runs ahead."""

    def __init__(self, seqs: list[Sequence], loop: asyncio.AbstractEventLoop):
        self.seqs = seqs
        self.request_ids = [s.request_id for s in seqs]
        self.loop = loop
        self._pending: dict[int, RequestOutput] = {}
        self._order: deque[int] = deque()
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()
        self._remaining = len(seqs)

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def _push(self, index: int, item: object) -> None:  # on the loop's thread
        if isinstance(item, BaseException):
            self._error = self._error or item
        else:
            prev = self._pending.get(index)
            if prev is None:
                self._order.append(index)
            self._pending[index] = merge_outputs(prev, item)
        self._wakeup.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while True:
            if self._remaining == 0:
                raise StopAsyncIteration
            if self._order:
                index = self._order.popleft()
                out = self._pending.pop(index)
                if out.finished:
                    self._remaining -= 1
                return index, out
            if self._error is not None:
                self._remaining = 0
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()


def _put_all(items: list[tuple[RequestHandle, int, object]]) -> None:
    for handle, index, item in items:
        handle._push(index, item)


class AsyncEngine:
    """Runs ``engine`` and an output processor on a daemon thread.

    Read-only gauges, refreshed by the engine thread after every step: ``num_running`` (sequences in the decode
    batch), ``num_waiting`` (sequences queued in the engine), ``num_cache_rows`` (live KV-cache rows), ``steps``.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.processor = OutputProcessor(engine.tokenizer, engine.finish_request)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._live: dict[str, tuple[RequestHandle, int]] = {}  # engine thread only
        self.num_running = 0
        self.num_waiting = 0
        self.num_cache_rows = 0
        self.steps = 0
        self.failures = 0
        self.trimmer = IdleTrimmer()  # freed memory back to the system when the engine goes idle (qwen2vl.memory)

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine thread is already running")
        self._thread = threading.Thread(target=self._run, name="qwen2vl-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still in flight end with EngineError."""
        if self._thread is None:
            return
        self._cmds.put(("stop", None))
        self._thread.join(timeout)
        self._thread = None

    def submit(self, seqs: list[Sequence]) -> RequestHandle:
        """Queue ``seqs`` (one request's completions) for the engine; call from the event loop's thread."""
        if not self.running:
            raise EngineError("the engine is not running")
        handle = RequestHandle(list(seqs), asyncio.get_running_loop())
        self._cmds.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Abort whatever of the handle's sequences is still queued or running (a no-op for finished ones)."""
        if not handle.done:
            self._cmds.put(("abort", handle))

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                cmds = [self._cmds.get()] if idle else []
                while True:
                    try:
                        cmds.append(self._cmds.get_nowait())
                    except queue.Empty:
                        break
                out: list[tuple[RequestHandle, int, object]] = []
                stop = False
                for kind, arg in cmds:
                    if kind == "add":
                        self._add(arg, out)
                    elif kind == "abort":
                        self._abort(arg)
                    elif kind == "stop":
                        stop = True
                if stop:
                    self._deliver(out)
                    break
                worked = self.engine.has_unfinished_requests()
                if worked:
                    failed = None
                    try:
                        self.engine.step()
                    except Exception as e:  # noqa: BLE001 - the model failed; keep serving the others
                        self.failures += 1
                        log.exception("engine step failed")
                        failed = e
                    self.steps += 1
                    for o in self.processor.process():  # after a failed step too: what finished is reported
                        entry = self._live.get(o.request_id)
                        if entry is None:
                            continue
                        out.append((entry[0], entry[1], o))
                        if o.finished:
                            del self._live[o.request_id]
                    if failed is not None:
                        self._recover(failed, out)
                self._refresh()
                self._deliver(out)
                self.trimmer.after_step(not self.engine.has_unfinished_requests(), worked)
        except BaseException:  # pragma: no cover - a bug in this loop: fail everything rather than hang
            log.exception("engine thread crashed")
            raise
        finally:
            out = []
            for rid, (handle, index) in list(self._live.items()):
                self.engine.abort_request(rid)
                self.processor.abort_request(rid)
                out.append((handle, index, EngineError("the server is shutting down")))
            self._live.clear()
            self._refresh()
            self._deliver(out)

    def _add(self, handle: RequestHandle, out: list) -> None:
        added = []
        try:
            for seq in handle.seqs:
                self.engine.add_request(seq)
                added.append(seq)
                self.processor.add_request(seq)
        except Exception as e:  # noqa: BLE001 - refused (InvalidInputError) or broken: tell that request only
            for seq in added:
                self.engine.abort_request(seq.request_id)
                self.processor.abort_request(seq.request_id)
            err = e if isinstance(e, InvalidInputError) else EngineError(f"could not queue the request: {e}")
            out.append((handle, 0, err))
            return
        for i, seq in enumerate(handle.seqs):
            self._live[seq.request_id] = (handle, i)

    def _abort(self, handle: RequestHandle) -> None:
        for rid in handle.request_ids:
            if self._live.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                self.processor.abort_request(rid)

    def _recover(self, error: Exception, out: list) -> None:
        """After a failed step (whose finished sequences the processor has reported already): the sequence the
        engine dropped gets the error; if nothing was dropped, everything in flight is ended."""
        culprit = False
        for rid, (handle, index) in list(self._live.items()):
            seq = handle.seqs[index]
            if seq.finished and seq.finish_reason == "abort" and rid not in self.engine.requests:
                del self._live[rid]
                culprit = True
                out.append((handle, index, EngineError(f"the model failed on this request: {error}")))
        if not culprit:
            for rid, (handle, index) in list(self._live.items()):
                del self._live[rid]
                self.engine.abort_request(rid)
                self.processor.abort_request(rid)
                out.append((handle, index, EngineError(f"the engine failed: {error}")))

    def _refresh(self) -> None:
        e = self.engine
        self.num_running = e.num_running
        self.num_waiting = len(e.scheduler.waiting)
        cache = getattr(getattr(e, "runner", None), "cache", None)
        self.num_cache_rows = int(getattr(cache, "num_live", 0) or 0)

    def _deliver(self, items: list[tuple[RequestHandle, int, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for handle, _, _ in batch:
                    self._abort(handle)
