"""The dashboard's files as HTTP serves them (the page itself is tested in a real browser,
test_gw_dashboard_browser.py), and the two things the API gained for it: /api/whoami and
the job record's ``seq``."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx
from gateway_helpers import RunningGateway, collect

from pgjobs.gateway import dashboard


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def _assert_locked_down(headers: httpx.Headers) -> None:
    csp = headers.get("content-security-policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert headers.get("x-content-type-options") == "nosniff"


async def test_the_page_is_served_at_the_root_with_a_strict_csp(gateway: RunningGateway) -> None:
    async with gateway.http(None) as http:
        r = await http.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        _assert_locked_down(r.headers)
        page = _Tags()
        page.feed(r.text)
        # No inline script and no event-handler attribute: the CSP would block them, and
        # the page must not need them.
        assert page.script_text.strip() == ""
        assert all(not k.startswith("on") for _, attrs in page.tags for k in attrs)
        # Every file the page loads is from this origin, and served locked down too.
        urls = [
            attrs.get("src") or attrs.get("href")
            for tag, attrs in page.tags
            if tag in ("script", "link", "img")
        ]
        assert urls
        types = {}
        for url in urls:
            assert url is not None
            assert url.startswith("/static/"), url
            asset = await http.get(url)
            assert asset.status_code == 200, url
            _assert_locked_down(asset.headers)
            types[url.rsplit(".", 1)[1]] = asset.headers["content-type"]
        assert types["js"].startswith(("text/javascript", "application/javascript"))
        assert types["css"].startswith("text/css")
        assert (await http.get("/static/nothing-here.js")).status_code == 404


def test_the_files_ship_inside_the_package() -> None:
    # Served from the package directory (hatch puts every file under src/pgjobs in the
    # wheel), so an installed gateway serves the page without a checkout.
    names = {p.name for p in dashboard.STATIC_DIR.iterdir()}
    assert {"index.html", "dashboard.js", "dashboard.css"} <= names
    script = (dashboard.STATIC_DIR / "dashboard.js").read_text()
    # Job text reaches the DOM as text only.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)


async def test_whoami_names_the_tokens_company(gateway: RunningGateway) -> None:
    async with gateway.http("globex") as http:
        r = await http.get("/api/whoami")
        assert r.status_code == 200
        assert r.json() == {"companyId": "globex", "operator": False}
    async with gateway.http(None) as http:
        r = await http.get("/api/whoami")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        bad = await http.get("/api/whoami", headers={"Authorization": "Bearer pgj_nope"})
        assert bad.status_code == 401


async def test_a_job_record_carries_the_seq_of_its_last_event(gateway: RunningGateway) -> None:
    job = await gateway.state.client.enqueue("acme", "echo", {})
    await gateway.state.client.cancel("acme", job.id)
    path = f"/api/companies/acme/content-jobs/{job.id}"
    async with gateway.http() as http:
        record = (await http.get(path)).json()
        listed = (await http.get("/api/companies/acme/content-jobs")).json()
    events = await collect(gateway, path + "/events", last_event_id="0")
    assert [e.data["seq"] for e in events] == [1, 2]
    assert record["seq"] == events[-1].data["seq"] == 2
    assert listed[0]["seq"] == 2
