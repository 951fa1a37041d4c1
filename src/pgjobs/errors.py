"""Exceptions pgjobs raises. Every message says what happened and what to do next."""

from __future__ import annotations


class PgjobsError(Exception):
    """Base class for every error pgjobs raises on purpose."""


class ConfigurationError(PgjobsError):
    """A setting (DSN, handler path, limit...) is missing or malformed."""


class DatabaseUnavailableError(PgjobsError):
    """The database cannot be reached or refused the connection."""


class LockTimeoutError(PgjobsError):
    """A lock pgjobs needs was not granted in time; nothing was changed."""


class NotMigratedError(PgjobsError):
    """The database is reachable but has no pgjobs schema."""

    def __init__(self) -> None:
        super().__init__("the database has no pgjobs schema: run `pgjobs migrate` first")


class SchemaBehindError(PgjobsError):
    """The database has pgjobs' schema, without migrations this pgjobs needs."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        named = missing[0] if len(missing) == 1 else f"{missing[0]} to {missing[-1]}"
        super().__init__(
            f"the database's pgjobs schema is older than this pgjobs (missing migration"
            f"{'s' if len(missing) > 1 else ''} {named}): run `pgjobs migrate`"
        )


class JobNotFoundError(PgjobsError):
    """No job with that id exists for that company."""

    def __init__(self, job_id: object) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class InvalidTransitionError(PgjobsError):
    """The job exists but its current status does not allow the requested change."""

    def __init__(self, job_id: object, action: str, status: str) -> None:
        super().__init__(f"cannot {action} job {job_id}: it is {status}")
        self.job_id = job_id
        self.action = action
        self.status = status


class InvalidJobError(PgjobsError, ValueError):
    """Enqueue arguments that can never make a valid job (empty type, bad input...)."""


class AssetTooLargeError(PgjobsError):
    """A handler produced an asset larger than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"generated asset exceeds the limit of {limit} bytes "
            "(raise PGJOBS_GENERATED_ASSET_MAX_BYTES to allow larger outputs)"
        )
        self.limit = limit


class InvalidAssetError(PgjobsError, ValueError):
    """A handler's GeneratedAsset that could never be served as given (a content type
    that is not a valid HTTP header value). The job fails without a retry."""


class StorageError(PgjobsError):
    """The asset storage backend failed or refused a request (an S3 bucket missing,
    credentials rejected, the endpoint unreachable). The message says which and what
    to fix; a worker retries the job, the gateway answers 503."""


class LeaseLostError(PgjobsError):
    """Raised at the end of a handler's ``ctx.transaction()`` block when the attempt no
    longer holds its job (cancelled, or its lease expired and another attempt took it):
    the transaction was rolled back, so none of the handler's writes in it were kept and
    the job was not finished by this attempt."""

    def __init__(self, job_id: object, attempt: int) -> None:
        super().__init__(
            f"job {job_id} attempt {attempt}: this worker no longer holds the job (cancelled, "
            "or its lease expired and another attempt took it); the transaction was rolled "
            "back, nothing written in it was kept, and the job was not completed by this attempt"
        )
        self.job_id = job_id
        self.attempt = attempt
