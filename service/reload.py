"""Live model reload: load the bundle the settings point to, check and warm it off the request
path, then swap it in. Only the runtime changes: how batches run is the scheduler's, which
stays. Requests admitted before the swap finish on the model that read them
(the batcher never mixes models in a batch); requests after it get the new one. A bundle that
fails its checks is refused and the old model keeps serving.

Triggered by SIGHUP (``python -m service``) or, when enabled, ``POST /admin/reload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from service.allocator import refreeze
from service.bundle import BundleError
from service.config import Settings
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.pipeline import Predictor
from service.runtime import ModelRuntime
from service.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reloaded:
    name: str
    version: str
    previous_version: str
    seconds: float


def model_labels(runtime: ModelRuntime, scheduler: Scheduler) -> tuple[str, ...]:
    """The ``model_info`` labels of a runtime: name, version, device, dtype, and what runs its
    batches under ``scheduler``."""
    card = runtime.card
    where = scheduler.runtime(runtime.has_onnx)
    return card.name, card.version, str(runtime.device), runtime.precision, where


_requested_during_start = False


def request_during_start() -> None:
    """A SIGHUP before the service serves (``python -m service``'s handler): noted, and
    answered by a reload once it serves (``take_request_during_start``), since the bundle may
    have changed after the load began."""
    global _requested_during_start
    _requested_during_start = True
    log.warning("SIGHUP during start-up: the model will be reloaded once it serves")


def take_request_during_start() -> bool:
    """Whether a SIGHUP came during start-up; from now on, none did."""
    global _requested_during_start
    requested, _requested_during_start = _requested_during_start, False
    return requested


def _retrieve(future: asyncio.Future[Reloaded]) -> None:
    if not future.cancelled():
        future.exception()


class Reloader:
    """Reloads one predictor's model from its bundle ``folder``."""

    def __init__(
        self, predictor: Predictor, folder: Path, settings: Settings, metrics: Metrics
    ) -> None:
        self.predictor = predictor
        self.folder = folder
        self.settings = settings
        self.metrics = metrics
        self._lock = asyncio.Lock()  # one reload at a time
        self._next: asyncio.Future[Reloaded] | None = None  # the reload callers wait for
        self._tasks: set[asyncio.Task[None]] = set()

    async def reload(self) -> Reloaded:
        """Reload, merged with the others asked for meanwhile: while one runs, every request
        joins the one next reload (which reads the bundle after all of them were made), so a
        client spamming the route costs at most two loads, not one per request."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._after_the_running_one())
            # Answered to every caller; retrieved here too, in case all of them left.
            self._next.add_done_callback(_retrieve)
        return await asyncio.shield(self._next)

    async def _after_the_running_one(self) -> Reloaded:
        async with self._lock:
            self._next = None  # requests from now on may find a newer bundle: a later reload
            return await self._reload()

    async def _reload(self) -> Reloaded:
        started = time.monotonic()
        s = self.settings
        try:
            new = await asyncio.to_thread(
                ModelRuntime.load, self.folder, s.device, s.dtype, s.runtime
            )
            served = self.predictor.runtime.card.name
            if new.card.name != served:  # the name is the model's address
                raise BundleError(
                    f"{self.folder}: its card names {new.card.name!r}, not {served!r}; "
                    "restart the service to serve a renamed model"
                )
            if s.warmup:
                ways = self.predictor.batcher.scheduler.warm_ups()
                await asyncio.to_thread(new.warmup, ways)
        except Exception as exc:  # a BundleError, or a model that fails on its warm-up
            self.metrics.reloads.labels("failed").inc()
            # A BundleError's message is the service's own (what is wrong with which file):
            # one line, in the log and the answer. Anything else: its traceback, logged.
            if isinstance(exc, BundleError):
                reason = str(exc)
                log.error("reload refused, the previous model keeps serving: %s", exc)
            else:
                reason = "see the server log"
                log.exception("reload refused, the previous model keeps serving")
            raise ServiceError(
                ErrorType.RELOAD_FAILED,
                f"reload refused, the previous model keeps serving: {reason}",
            ) from exc
        old = self.predictor.runtime
        self.predictor.runtime = new  # from here on, new requests read with the new model
        scheduler = self.predictor.batcher.scheduler
        self.metrics.model_info.remove(*model_labels(old, scheduler))
        self.metrics.model_info.labels(*model_labels(new, scheduler)).set(1)
        self.metrics.reloads.labels("succeeded").inc()
        refreeze()
        seconds = time.monotonic() - started
        log.info(
            "reloaded %s: version %s -> %s in %.1f s",
            new.card.name,
            old.card.version,
            new.card.version,
            seconds,
        )
        return Reloaded(new.card.name, new.card.version, old.card.version, seconds)

    def on_signal(self) -> None:
        """SIGHUP (called by the event loop): start a reload; its outcome goes to the log and
        the metrics."""
        task = asyncio.ensure_future(self._reload_quietly())
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ServiceError):  # logged and counted by reload()
            await self.reload()
