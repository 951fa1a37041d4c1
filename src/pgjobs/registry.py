"""Handlers keyed by job type.

    registry = Registry()

    @registry.handler("render", timeout=300)
    async def render(ctx: JobContext) -> GeneratedAsset: ...

Async handlers run on the worker's event loop; plain functions run in the worker's
thread pool (one thread per concurrency slot), so blocking code does not stall it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgjobs.errors import ConfigurationError

if TYPE_CHECKING:
    from pgjobs.context import JobContext

HandlerFn = Callable[["JobContext"], Awaitable[Any]] | Callable[["JobContext"], Any]


@dataclass(frozen=True, slots=True)
class Handler:
    job_type: str
    fn: HandlerFn
    is_async: bool
    timeout: float | None


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

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
