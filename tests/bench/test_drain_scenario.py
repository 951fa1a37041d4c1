"""The drain and wake-up scenarios measure 1, 2 and 4 processes, say whether each queue's
rate never falls with more processes, and go on past a peer whose run fails or stalls;
a drain that stops making progress is given up as stalled, and the harness's counts
are cancelled rather than waited on forever. No timing is asserted."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bench.context import TINY, Ctx
from bench.scenarios import drain as scenario
from bench.scenarios import wakeup

from bench import drain as drain_mod
from bench import systems

# Made-up rates: pgjobs and awa never slower with more processes, pgqueuer slower at 4.
RATES = {
    "pgjobs": {1: 100.0, 2: 120.0, 4: 130.0},
    "pgqueuer": {1: 150.0, 2: 200.0, 4: 180.0},
    "awa": {1: 50.0, 2: 60.0, 4: 70.0},
}


def _ctx(tmp_path: Path, *names: str) -> Ctx:
    return Ctx("", TINY, "tiny", 3, tmp_path, names)


@contextmanager
def _no_db(ctx: Ctx, system: str, n: int) -> Iterator[str]:
    yield f"db-of-{system}"


def _fake_drain(stall_at: tuple[str, int] | None) -> Any:
    calls: list[tuple[str, int]] = []

    def fake(
        ctx: Ctx, system: str, dsn: str, n: int, procs: int, config: Any, **kw: Any
    ) -> dict[str, Any]:
        calls.append((system, procs))
        assert kw == {"stall": drain_mod.STALL_SECONDS}
        if (system, procs) == stall_at:
            raise drain_mod.Stalled(f"{system}: no job finished for 60s (3 of {n} done)")
        return {"jobs_per_s": RATES[system][procs], "seconds": 1.0, "jobs": n}

    fake.calls = calls  # type: ignore[attr-defined]
    return fake


def test_drain_measures_1_2_4_processes_interleaved_and_reports_scaling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_drain(None)
    monkeypatch.setattr(scenario, "queue_db", _no_db)
    monkeypatch.setattr(scenario, "drain", fake)
    monkeypatch.setattr(scenario, "pgjobs_batches", lambda dsn: None)
    res = scenario.run(_ctx(tmp_path, "pgjobs", "pgqueuer", "awa"))
    # Each round runs every process count of every queue once.
    one_round = [(s, p) for p in (1, 2, 4) for s in ("pgjobs", "pgqueuer", "awa")]
    assert fake.calls == one_round * 3
    assert res["systems"]["pgjobs"]["processes"]["4"]["jobs_per_s"]["values"] == [130.0] * 3
    assert res["scaling"]["pgjobs"]["never_slower"] is True
    assert res["scaling"]["pgqueuer"]["never_slower"] is False
    assert res["scaling"]["pgqueuer"]["steps"]["2→4"] == pytest.approx(0.9)
    assert res["ratio"]["4"]["vs_pgqueuer"] == pytest.approx(130 / 180)
    md = scenario.markdown(res)
    assert "| 4 processes (jobs/s) |" in md
    assert "| 1→2 +33%, 2→4 -10%: **no** |" in md  # pgqueuer's row
    rows = {t["target"]: t for t in scenario.targets(res)}
    scaling = rows["drain never slower with more processes (1 → 2 → 4)"]
    assert scaling["met"] is True
    assert "pgqueuer 1→2 +33%, 2→4 -10%: **no**" in scaling["measured"]
    pgq = rows["drain ≥ 1.2× pgqueuer (1 and 2 processes)"]  # noqa: RUF001
    assert pgq["measured"] == "1 process(es) 0.67×, 2 process(es) 0.60×"  # noqa: RUF001


def test_a_stalled_peer_is_reported_and_the_others_are_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_drain(("awa", 2))
    monkeypatch.setattr(scenario, "queue_db", _no_db)
    monkeypatch.setattr(scenario, "drain", fake)
    monkeypatch.setattr(scenario, "pgjobs_batches", lambda dsn: None)
    res = scenario.run(_ctx(tmp_path, "pgjobs", "awa"))
    awa = res["systems"]["awa"]
    assert awa["failed"].startswith("2 process(es), round 1: Stalled: awa: no job finished")
    assert awa["processes"]["1"]["jobs_per_s"]["values"] == [50.0]  # before the stall
    assert ("awa", 4) not in fake.calls  # not measured further
    assert fake.calls.count(("pgjobs", 4)) == 3
    assert res["scaling"]["awa"] is None
    assert "awa: failed or stalled, not measured further" in scenario.markdown(res)


def test_a_failure_of_pgjobs_fails_the_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scenario, "queue_db", _no_db)
    monkeypatch.setattr(scenario, "drain", _fake_drain(("pgjobs", 2)))
    monkeypatch.setattr(scenario, "pgjobs_batches", lambda dsn: None)
    with pytest.raises(drain_mod.Stalled):
        scenario.run(_ctx(tmp_path, "pgjobs", "awa"))


def test_wakeup_goes_on_past_a_failed_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[str] = []

    def fake_measure(ctx: Ctx, system: str, n: int, stamp_dir: Path) -> list[float]:
        measured.append(system)
        if system == "awa":
            raise TimeoutError("awa worker 0 did not say 'done' within 30s")
        return [1.0, 2.0, 3.0]

    monkeypatch.setattr(wakeup, "measure", fake_measure)
    res = wakeup.run(_ctx(tmp_path, "pgjobs", "awa"))
    assert measured == ["pgjobs", "awa", "pgjobs", "pgjobs"]
    assert res["systems"]["pgjobs"]["p50_ms"]["n"] == 3
    assert res["systems"]["awa"]["failed"].startswith("round 1: TimeoutError")
    assert "awa: failed, not measured further" in wakeup.markdown(res)


@pytest.mark.timeout(300)
def test_an_awa_drain_runs_and_one_that_stops_making_progress_is_given_up(
    dsn: str, tmp_path: Path
) -> None:
    """awa's worker stops at the completed count the harness passes; asked for 5 more
    jobs than are queued, it never gets there, and the harness gives up once no job has
    finished for `stall` seconds (not at the drain's overall timeout)."""
    pytest.importorskip("awa")
    ctx = _ctx(tmp_path, "awa")
    asyncio.run(systems.install("awa", dsn))
    asyncio.run(drain_mod._fill("awa", dsn, 50))
    r = drain_mod.drain(ctx, "awa", dsn, 50, 1, stall=3.0)
    assert r["jobs"] == 50
    # The count of jobs left goes through awa's view, which is planned from statistics
    # (unanalyzed after a 100,000-job drain, its count ran past 60 s): counts analyzes.
    before = _awa_analyzes(dsn)
    assert systems.counts("awa", dsn) == (50, 0)
    deadline = time.monotonic() + 30
    while _awa_analyzes(dsn) <= before:
        assert time.monotonic() < deadline, "counts did not analyze awa's tables"
        time.sleep(0.05)
    asyncio.run(drain_mod._fill("awa", dsn, 5))
    with pytest.raises(drain_mod.Stalled, match=r"awa: no job finished for \d+s \(5 of 10 done\)"):
        drain_mod.drain(ctx, "awa", dsn, 10, 1, timeout=240, stall=3.0)


def _awa_analyzes(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(analyze_count), 0) FROM pg_stat_user_tables "
            "WHERE schemaname = 'awa'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.timeout(60)
def test_counts_are_cancelled_rather_than_waited_on(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(systems, "COUNT_TIMEOUT", "200ms")
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute("LOCK TABLE pgjobs.jobs IN ACCESS EXCLUSIVE MODE")
            holding.set()
            release.wait(50)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert holding.wait(30)
        with pytest.raises(psycopg.errors.QueryCanceled):
            systems.counts("pgjobs", dsn, with_left=False)
    finally:
        release.set()
        holder.join(30)
