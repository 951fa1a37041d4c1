"""The completer's parameters for job_finish_many_if_leased: the per-job arrays as
PostgreSQL array literals it writes itself, ids from the text each attempt made once."""

from __future__ import annotations

from helpers import running_job
from pgjobs.completer import Outcome, finish_params


def _outcome(kind: str, lease_token: int, retry_delay: float = 0.0) -> Outcome:
    return Outcome(running_job("t", lease_token), kind, retry_delay=retry_delay)


def test_the_per_job_arrays_are_literals_of_what_the_worker_has() -> None:
    done, retried = _outcome("done", 7), _outcome("error", 2**40, retry_delay=0.1 + 0.2)
    # The worker's text of the id is sent as it is (not made again from the UUID).
    done.id_text = str(done.job.id).upper()
    params = finish_params([done, retried])
    assert params["ids"] == "{" + f"{str(done.job.id).upper()},{retried.job.id}" + "}"
    assert params["lease_tokens"] == "{7,1099511627776}"
    assert params["outcomes"] == "{done,error}"
    assert params["retry_delays"] == "{0.0,0.30000000000000004}"
    assert float(params["retry_delays"][1:-1].split(",")[1]) == 0.1 + 0.2  # read back exactly
    assert params["results"] is None
    assert params["errors"] is None
