"""Handlers keyed by job type.

    registry = Registry()

    @registry.handler("render", timeout=300)
    async def render(ctx: JobContext) -> GeneratedAsset: ...

Async handlers run on the worker's event loop; plain functions run in the worker's
thread pool (one thread per concurrency slot), so blocking code does not stall it.

Periodic jobs are declared next to the handlers (see pgjobs.schedules and
pgjobs.scheduler); every worker started with this registry enqueues their slots:

    @registry.periodic("0 2 * * *", job_type="report", company_id="acme",
                       timezone="Europe/Berlin")
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pgjobs.errors import ConfigurationError
from pgjobs.jobspec import DEFAULT_MAX_ATTEMPTS
from pgjobs.schedules import Schedule

if TYPE_CHECKING:
    from pgjobs.context import JobContext

HandlerFn = Callable[["JobContext"], Awaitable[Any]] | Callable[["JobContext"], Any]
F = TypeVar("F")


@dataclass(frozen=True, slots=True)
class Handler:
    job_type: str
    fn: HandlerFn
    is_async: bool
    timeout: float | None


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._schedules: dict[str, Schedule] = {}

    def register(self, job_type: str, fn: HandlerFn, *, timeout: float | None = None) -> None:
        if not job_type:
            raise ConfigurationError("a handler needs a non-empty job type")
        if job_type in self._handlers:
            raise ConfigurationError(f"job type {job_type!r} already has a handler")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout for {job_type!r} must be positive")
        is_async = inspect.iscoroutinefunction(fn)
        self._handlers[job_type] = Handler(job_type, fn, is_async, timeout)

    def handler(
        self, job_type: str, *, timeout: float | None = None
    ) -> Callable[[HandlerFn], HandlerFn]:
        def decorate(fn: HandlerFn) -> HandlerFn:
            self.register(job_type, fn, timeout=timeout)
            return fn

        return decorate

    def periodic(
        self,
        cron: str,
        *,
        job_type: str,
        company_id: str,
        input: Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        catch_up: timedelta = timedelta(0),
        name: str | None = None,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Callable[[F], F]:
        """Declare a schedule: one ``job_type`` job for ``company_id`` per slot of ``cron``
        in ``timezone``. Registered when called, so it works as a decorator on the
        handler or as a plain call; the decorated function is returned unchanged.

        ``name`` (default ``company_id:job_type``) identifies the schedule in the
        database: keep it when changing the cron expression. ``catch_up``: how late a
        missed slot may still be enqueued once, when a worker starts after it."""
        schedule = Schedule(
            name=name or f"{company_id}:{job_type}",
            cron=cron,
            job_type=job_type,
            company_id=company_id,
            input=input or {},
            timezone=timezone,
            catch_up=catch_up,
            priority=priority,
            max_attempts=max_attempts,
        )
        if schedule.name in self._schedules:
            raise ConfigurationError(
                f"schedule {schedule.name!r} is already declared; give the second a name="
            )
        self._schedules[schedule.name] = schedule

        def decorate(fn: F) -> F:
            return fn

        return decorate

    @property
    def schedules(self) -> Mapping[str, Schedule]:
        """The declared schedules, by name."""
        return dict(self._schedules)

    def get(self, job_type: str) -> Handler | None:
        return self._handlers.get(job_type)

    @property
    def job_types(self) -> tuple[str, ...]:
        return tuple(sorted(self._handlers))

    def __len__(self) -> int:
        return len(self._handlers)


def load(path: str) -> Registry:
    """Import ``package.module:attribute`` and return the Registry it names."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"--handlers must look like package.module:registry, got {path!r}")
    # Like celery and rq: a handler module in the directory the worker is started from is
    # importable without installing it (the console script does not put cwd on sys.path).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import handler module {module_name!r}: {exc}") from None
    registry = getattr(module, attr, None)
    if not isinstance(registry, Registry):
        raise ConfigurationError(
            f"{path} is not a pgjobs Registry (found {type(registry).__name__})"
        )
    return registry
