"""The gateway's settings, read from PGJOBS_GATEWAY_* environment variables.

Every limit that protects the gateway (body size, stream caps, queue sizes, timeouts) is
here with its default, so an operator can see in one place what a client may cost.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from pgjobs.config import MIB, env_float, env_int
from pgjobs.errors import ConfigurationError

KIB = 1024


def _env_list(name: str) -> tuple[str, ...] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, got {raw!r}")


def _env_secret() -> tuple[bytes, bool]:
    raw = os.environ.get("PGJOBS_GATEWAY_SECRET")
    if raw:
        if len(raw) < 32:
            raise ConfigurationError("PGJOBS_GATEWAY_SECRET must be at least 32 characters")
        return raw.encode(), True
    # Random per process: stream tokens then only work on the process that issued them.
    # Several gateway processes behind one load balancer must share a configured secret.
    return secrets.token_bytes(32), False


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    # A request body is counted while it streams in; a larger one gets 413 before it is
    # buffered, whatever Content-Length claims.
    max_body_bytes: int = MIB + 64 * KIB
    # The job's ``input`` object, re-encoded as compact JSON.
    max_input_bytes: int = MIB
    # None accepts any job type jobspec accepts (non-empty, up to 200 characters).
    job_types: tuple[str, ...] | None = None
    # Accept only types that some live worker registered (pgjobs.workers).
    require_live_worker: bool = False
    live_worker_seconds: float = 30.0
    cors_origins: tuple[str, ...] = ()
    pool_size: int = 10
    # How long a request waits for a pool connection before 503 + Retry-After, and how
    # many may wait at once before the rest get 503 immediately.
    pool_timeout_seconds: float = 5.0
    pool_max_waiting: int = 50
    max_streams: int = 1000
    max_streams_per_company: int = 100
    subscriber_queue_size: int = 256
    ping_seconds: float = 15.0
    # A stream whose client does not take a chunk within this long is dropped (a frozen
    # or vanished browser must not hold memory and a slot forever).
    send_timeout_seconds: float = 10.0
    # A company feed whose last read saw rows held back by the visibility horizon re-reads
    # this often without a NOTIFY (the horizon advances without one); a feed with nothing
    # held back only every company_idle_poll_seconds (see pgjobs.gateway.companystream.CompanyFeed).
    company_poll_seconds: float = 1.0
    company_idle_poll_seconds: float = 30.0
    # Every job stream and company feed is caught up from the table this often, for events
    # whose ring was lost between its commit and its send (pgjobs.gateway.jobreader).
    catch_up_seconds: float = 2.0
    stream_token_max_seconds: int = 300
    # Open event streams whose API token was revoked end within this (one query per
    # interval for all of them, pgjobs.gateway.revocation).
    revocation_check_seconds: float = 2.0
    # Before a request is authenticated it may cost this much: its request line and
    # headers must fit in max_header_bytes and arrive within header_timeout_seconds
    # (pgjobs.gateway.protocol), or the connection is closed.
    max_header_bytes: int = 16 * KIB
    header_timeout_seconds: float = 10.0
    listener_heartbeat_seconds: float = 5.0
    # Idempotency-Key (pgjobs.gateway.idempotency): how long a key answers with its first
    # response, and how long a retry waits for a request still holding it before 409.
    idempotency_seconds: float = 86400.0
    idempotency_wait_seconds: float = 10.0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    secret_configured: bool = False

    @classmethod
    def from_env(cls, **overrides: object) -> GatewaySettings:
        secret, configured = _env_secret()
        values: dict[str, object] = {
            "max_body_bytes": env_int("PGJOBS_GATEWAY_MAX_BODY_BYTES", MIB + 64 * KIB, minimum=1),
            "max_input_bytes": env_int("PGJOBS_GATEWAY_MAX_INPUT_BYTES", MIB, minimum=2),
            "job_types": _env_list("PGJOBS_GATEWAY_JOB_TYPES"),
            "require_live_worker": _env_bool("PGJOBS_GATEWAY_REQUIRE_LIVE_WORKER", False),
            "live_worker_seconds": env_float("PGJOBS_GATEWAY_LIVE_WORKER_SECONDS", 30.0),
            "cors_origins": _env_list("PGJOBS_GATEWAY_CORS_ORIGINS") or (),
            "pool_size": env_int("PGJOBS_GATEWAY_POOL_SIZE", 10, minimum=1),
            "pool_timeout_seconds": env_float(
                "PGJOBS_GATEWAY_POOL_TIMEOUT_SECONDS", 5.0, minimum=0.01
            ),
            "pool_max_waiting": env_int("PGJOBS_GATEWAY_POOL_MAX_WAITING", 50),
            "max_streams": env_int("PGJOBS_GATEWAY_MAX_STREAMS", 1000, minimum=1),
            "max_streams_per_company": env_int(
                "PGJOBS_GATEWAY_MAX_STREAMS_PER_COMPANY", 100, minimum=1
            ),
            "subscriber_queue_size": env_int("PGJOBS_GATEWAY_QUEUE_SIZE", 256, minimum=1),
            "ping_seconds": env_float("PGJOBS_GATEWAY_PING_SECONDS", 15.0, minimum=0.1),
            "send_timeout_seconds": env_float(
                "PGJOBS_GATEWAY_SEND_TIMEOUT_SECONDS", 10.0, minimum=0.1
            ),
            "company_poll_seconds": env_float(
                "PGJOBS_GATEWAY_COMPANY_POLL_SECONDS", 1.0, minimum=0.05
            ),
            "company_idle_poll_seconds": env_float(
                "PGJOBS_GATEWAY_COMPANY_IDLE_POLL_SECONDS", 30.0, minimum=0.05
            ),
            "catch_up_seconds": env_float("PGJOBS_GATEWAY_CATCH_UP_SECONDS", 2.0, minimum=0.05),
            "max_header_bytes": env_int("PGJOBS_GATEWAY_MAX_HEADER_BYTES", 16 * KIB, minimum=1024),
            "header_timeout_seconds": env_float(
                "PGJOBS_GATEWAY_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.1
            ),
            "revocation_check_seconds": env_float(
                "PGJOBS_GATEWAY_REVOCATION_CHECK_SECONDS", 2.0, minimum=0.1
            ),
            "idempotency_seconds": env_float(
                "PGJOBS_GATEWAY_IDEMPOTENCY_SECONDS", 86400.0, minimum=1.0
            ),
            "idempotency_wait_seconds": env_float(
                "PGJOBS_GATEWAY_IDEMPOTENCY_WAIT_SECONDS", 10.0, minimum=0.001
            ),
            "secret": secret,
            "secret_configured": configured,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]  # keys are checked by the dataclass
        if settings.max_body_bytes < settings.max_input_bytes:
            raise ConfigurationError(
                "PGJOBS_GATEWAY_MAX_BODY_BYTES must be at least PGJOBS_GATEWAY_MAX_INPUT_BYTES"
            )
        return settings
