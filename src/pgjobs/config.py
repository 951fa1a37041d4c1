"""Settings, read from the environment with explicit defaults.

Every number a production operator may want to change is here, with its environment
variable; CLI flags override the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pgjobs.errors import ConfigurationError

MIB = 1024 * 1024
DEFAULT_LEASE_SECONDS = 15.0
MAX_GENERATED_ASSET_BYTES = 500 * MIB
"""Default cap on one generated asset; PGJOBS_GENERATED_ASSET_MAX_BYTES overrides it."""


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ConfigurationError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def env_bool(name: str, default: bool) -> bool:
    """on/off, true/false, yes/no or 1/0 (any case); unset or blank: ``default``."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be on or off, got {raw!r}")


def env_str(*names: str) -> str | None:
    """The first of these variables that is set and not blank, else None."""
    for name in names:
        raw = os.environ.get(name, "").strip()
        if raw:
            return raw
    return None


def state_dir() -> Path:
    """Where pgjobs keeps local state (embedded database, local assets): ./.pgjobs."""
    return Path(os.environ.get("PGJOBS_HOME", ".pgjobs")).resolve()


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker claims, leases and retries. Defaults suit jobs of seconds to minutes."""

    concurrency: int = 10
    # A lease outlives a missed heartbeat or two; a dead worker's jobs are rescued this
    # long after its last heartbeat at the latest.
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    heartbeat_seconds: float = 5.0
    rescue_interval_seconds: float = 2.0
    # Fallback poll when no NOTIFY arrives (listener down, PgBouncer, missed wake-up).
    poll_interval_seconds: float = 1.0
    # Completions wait at most this long to share one commit with others (0, 2 and 10 ms
    # measured in drains, not taken: pgjobs.completer).
    flush_interval_seconds: float = 0.005
    shutdown_grace_seconds: float = 10.0
    # How often the scheduler looks for due periodic-job slots (pgjobs.scheduler).
    schedule_interval_seconds: float = 1.0
    # Longest use of one pool connection (a query and its reply): past it the connection
    # is taken for half-open and replaced (pgjobs.db.GuardedPool).
    db_use_timeout_seconds: float = 30.0
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    job_types: tuple[str, ...] | None = None
    max_asset_bytes: int = MAX_GENERATED_ASSET_BYTES
    storage_dir: Path = field(default_factory=lambda: state_dir() / "storage")
    # s3://bucket/prefix puts assets in an S3-compatible bucket instead of storage_dir
    # (pgjobs.storage.from_settings); credentials come from botocore's usual chain.
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # The operations port (pgjobs.health): /metrics, /healthz, /readyz. None: not served.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Retention policy (pgjobs.retention), off by default: finished jobs and audit rows
    # older than these go, applied by one worker per retention_interval_seconds; every
    # worker checks every retention_check_seconds whether the interval's run is due.
    retention_jobs: timedelta | None = None
    retention_events: timedelta | None = None
    retention_assets: bool = False
    retention_interval_seconds: float = 3600.0
    retention_check_seconds: float = 60.0
    # Rings instead of NOTIFY items for the claim, progress and finish commits
    # (pgjobs.doorbell): those commits then carry no NOTIFY, whose lock PostgreSQL holds
    # through the commit's WAL flush, so several workers' commits can share a flush.
    # Off: every transition's items in its commit, as before sql/0019.
    doorbell: bool = True
    # How often, among all workers, one of them vacuums pgjobs.job_queue (pgjobs.queue_vacuum):
    # the claim walks the dead index entries claims leave until VACUUM, and autovacuum may
    # come only every autovacuum_naptime (60 s by default). 0: never, leave it to autovacuum.
    queue_vacuum_seconds: float = 5.0

    @classmethod
    def from_env(cls, **overrides: object) -> WorkerSettings:
        values: dict[str, object] = {
            "concurrency": env_int("PGJOBS_CONCURRENCY", 10, minimum=1),
            "lease_seconds": env_float("PGJOBS_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, minimum=0.5),
            "heartbeat_seconds": env_float("PGJOBS_HEARTBEAT_SECONDS", 5.0, minimum=0.1),
            "poll_interval_seconds": env_float("PGJOBS_POLL_INTERVAL_SECONDS", 1.0, minimum=0.01),
            "shutdown_grace_seconds": env_float("PGJOBS_SHUTDOWN_GRACE_SECONDS", 10.0),
            "rescue_interval_seconds": env_float(
                "PGJOBS_RESCUE_INTERVAL_SECONDS", 2.0, minimum=0.05
            ),
            "schedule_interval_seconds": env_float(
                "PGJOBS_SCHEDULE_INTERVAL_SECONDS", 1.0, minimum=0.05
            ),
            "db_use_timeout_seconds": env_float("PGJOBS_DB_USE_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            "retry_base_seconds": env_float("PGJOBS_RETRY_BASE_SECONDS", 1.0),
            "retry_max_seconds": env_float("PGJOBS_RETRY_MAX_SECONDS", 300.0),
            "max_asset_bytes": env_int(
                "PGJOBS_GENERATED_ASSET_MAX_BYTES", MAX_GENERATED_ASSET_BYTES, minimum=1
            ),
            "storage_dir": Path(os.environ.get("PGJOBS_STORAGE_DIR") or state_dir() / "storage"),
            "storage_url": env_str("PGJOBS_STORAGE_URL"),
            "s3_endpoint_url": env_str(
                "PGJOBS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
            ),
            "s3_region": env_str("AWS_REGION", "AWS_DEFAULT_REGION"),
            "metrics_port": env_int("PGJOBS_METRICS_PORT", -1, minimum=0),
            "metrics_host": os.environ.get("PGJOBS_METRICS_HOST") or "127.0.0.1",
        }
        # Imported here: pgjobs.retention needs the database modules, which need config.
        from pgjobs.retention import parse_duration

        for key, name in (
            ("retention_jobs", "PGJOBS_RETENTION_JOBS"),
            ("retention_events", "PGJOBS_RETENTION_EVENTS"),
        ):
            raw = env_str(name)
            values[key] = None if raw is None else parse_duration(raw, name)
        values["retention_assets"] = (env_str("PGJOBS_RETENTION_ASSETS") or "").lower() in (
            "1",
            "true",
            "yes",
            "on",
        )
        values["retention_interval_seconds"] = env_float(
            "PGJOBS_RETENTION_INTERVAL_SECONDS", 3600.0, minimum=1.0
        )
        values["doorbell"] = env_bool("PGJOBS_DOORBELL", True)
        values["queue_vacuum_seconds"] = env_float("PGJOBS_QUEUE_VACUUM_SECONDS", 5.0)
        if values["metrics_port"] == -1:
            values["metrics_port"] = None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]  # keys are checked by the dataclass
        if settings.heartbeat_seconds >= settings.lease_seconds:
            raise ConfigurationError(
                f"heartbeat interval ({settings.heartbeat_seconds}s) must be shorter than the "
                f"lease ({settings.lease_seconds}s), or every job would be rescued while running"
            )
        if 0 < settings.queue_vacuum_seconds < 1:
            raise ConfigurationError(
                f"PGJOBS_QUEUE_VACUUM_SECONDS must be 0 (off) or at least 1, got "
                f"{settings.queue_vacuum_seconds:g}"
            )
        return settings
