"""One thread that owns the engine: the HTTP server's requests go in, text pieces and results come out.

The engine is not thread-safe, so every call on it happens on this worker's thread. Other threads
(the server's asyncio loop) put commands in a lock-protected inbox: ``submit`` a request (its events
go to an ``asyncio.Queue`` through ``loop.call_soon_threadsafe``, see ``to_queue``), ``abort`` one, or ``call`` any
function of the engine (adding or removing an adapter) with a ``concurrent.futures.Future`` result.
Between commands the thread runs ``engine.step()`` while requests are unfinished and sleeps on an
event otherwise.

Events a request's queue receives, in order:

* ``("delta", text)``: new text (a possible start of a stop string and half a character are held
  back until the request ends, as ``Engine.stream`` does);
* ``("done", GenerationOutput)``: the request finished ("stop" or "length");
* ``("error", status, message)``: it failed (a step raised: status 500; shutdown: 503).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["EngineWorker", "WorkerStopped", "to_queue"]

log = logging.getLogger("deltatune.serve")


class WorkerStopped(RuntimeError):
    """The worker is shutting down and takes no new requests."""


@dataclass
class _Live:
    """A request the worker publishes events for."""

    deliver: Callable[[tuple], None]
    hold: int
    """Characters held back while running: the longest stop string's length - 1."""
    sent: int = 0
    """Characters of the text already published."""


class EngineWorker:
    """Runs ``engine`` on its own thread; ``start()`` it, ``shutdown()`` it.

    Args:
        engine: a ``deltatune.serve.Engine`` (touched by this worker's thread only once started).
        idle_wait: seconds the idle thread sleeps between looks at the inbox (it is woken at once
            by every command; this only bounds a missed wake-up).
    """

    def __init__(self, engine, idle_wait: float = 0.5):
        self.engine = engine
        self.idle_wait = idle_wait
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._live: dict[int, _Live] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self.steps_failed = 0

    # -- the server's side (any thread) -------------------------------------------------------------------
    def start(self) -> "EngineWorker":
        """Start the engine thread; returns self."""
        self._thread = threading.Thread(target=self._run, name="deltatune-engine", daemon=True)
        self._thread.start()
        return self

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread; the future holds its result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command():
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as e:  # handed to the caller
                    future.set_exception(e)

        self._put(command)
        return future

    def submit(self, prompt, adapter, params, deliver: Callable[[tuple], None]) -> concurrent.futures.Future:
        """Queue a request (``Engine.add_request(prompt, adapter, params)``); the future holds its id, or
        the engine's error (RequestRefused, KeyError, ValueError). ``deliver(event)`` is called on the
        engine thread with each event (``to_queue`` makes one for an asyncio queue)."""

        def add(engine):
            rid = engine.add_request(prompt, adapter, params)
            self._live[rid] = _Live(deliver, max((len(s) for s in params.stop), default=1) - 1)
            return rid

        return self.call(add)

    def abort(self, request_id: int) -> None:
        """End a request (its KV blocks are freed); no more events are published for it."""

        def command():
            if self._live.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self.engine.pop_output(request_id)  # forgotten by the engine

        self._put(command)

    def num_requests(self) -> int:
        """Requests waiting or running in the engine."""
        return len(self._live)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread: with ``drain``, after the running requests finish; else they get a 503 error now."""
        with self._lock:
            self._stopping, self._drain = True, drain
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _put(self, command: Callable[[], None]) -> None:
        with self._lock:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            self._inbox.append(command)
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._inbox:
                        break
                    command = self._inbox.popleft()
                command()
            if self._stopping and (not self._drain or not engine.has_unfinished()):
                break
            if not engine.has_unfinished():
                self._wake.wait(self.idle_wait)
                continue
            try:
                engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                self.steps_failed += 1
                log.exception("engine step failed")
                self._fail_all(500, f"the engine failed on this request: {type(e).__name__}: {e}")
                continue
            self._publish()
        self._fail_all(503, "the server shut down before this request finished")

    def _publish(self) -> None:
        """Send each live request its new text, and the finished ones their output."""
        for rid, live in list(self._live.items()):
            out = self.engine.output(rid)
            finished = bool(out.finish_reason)
            text = out.text if finished else out.text[: max(live.sent, len(out.text) - live.hold)].rstrip("\ufffd")
            if len(text) > live.sent:
                self._send(live, ("delta", text[live.sent:]))
                live.sent = len(text)
            if finished:
                del self._live[rid]
                self._send(live, ("done", self.engine.pop_output(rid)))

    def _fail_all(self, status: int, message: str) -> None:
        for rid, live in list(self._live.items()):
            del self._live[rid]
            try:
                self.engine.abort(rid)
                self.engine.pop_output(rid)
            except Exception:  # the engine's state is broken; the request is dropped all the same
                log.exception("could not abort request %d", rid)
            self._send(live, ("error", status, message))

    @staticmethod
    def _send(live: _Live, event: tuple) -> None:
        try:
            live.deliver(event)
        except Exception:  # the listener is gone (its loop closed): nothing to tell
            log.debug("dropped an event", exc_info=True)


def to_queue(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, tag=None) -> Callable[[tuple], None]:
    """A ``deliver`` for ``submit`` putting ``(tag, event)`` into ``queue`` on ``loop`` (from any thread)."""
    return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (tag, event))
