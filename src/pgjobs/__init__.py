"""pgjobs: a durable job queue for Python on PostgreSQL."""

from pgjobs.events import EventType
from pgjobs.types import Asset, Job, JobEvent, JobStatus, Progress

__all__ = ["Asset", "EventType", "Job", "JobEvent", "JobStatus", "Progress"]
__version__ = "0.1.0"
