"""`pgjobs limits set|list|clear` as a user types them."""

from __future__ import annotations

from test_cli import pgjobs


def test_limits_set_list_clear(dsn: str) -> None:
    out = pgjobs(
        "limits",
        "set",
        "--company",
        "acme",
        "--job-type",
        "render",
        "--max-running",
        "2",
        dsn=dsn,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "limit acme / render: max running 2, rate -"
    out = pgjobs("limits", "set", "--job-type", "render", "--rate", "60/min", dsn=dsn)
    assert out.returncode == 0, out.stderr
    out = pgjobs("limits", "list", dsn=dsn)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[1] == ["(all)", "render", "-", "60/60s", "0", "0"]
    assert lines[2] == ["acme", "render", "2", "-", "0", "-"]

    out = pgjobs("limits", "set", "--company", "acme", dsn=dsn)
    assert out.returncode == 2
    assert "give max_running, a rate" in out.stderr
    out = pgjobs("limits", "set", "--company", "acme", "--rate", "5/fortnight", dsn=dsn)
    assert out.returncode == 2
    assert "COUNT/PERIOD" in out.stderr

    out = pgjobs("limits", "clear", "--company", "acme", "--job-type", "render", dsn=dsn)
    assert (out.returncode, out.stdout.strip()) == (0, "cleared")
    out = pgjobs("limits", "clear", "--company", "acme", "--job-type", "render", dsn=dsn)
    assert out.returncode == 2
    assert "no limit has exactly" in out.stderr
    out = pgjobs("limits", "clear", "--job-type", "render", dsn=dsn)
    assert out.returncode == 0
    assert pgjobs("limits", "list", dsn=dsn).stdout.strip() == "no limits"
