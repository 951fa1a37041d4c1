"""The dashboard: a static page at ``/`` (HTML, CSS and JavaScript from ``static/``).

No build step and nothing from another origin: the files ship inside the package and are
served as they are. The page's data comes from the same JSON API and event streams any
client uses, with the token the user types in (held in the tab's ``sessionStorage``, sent
as ``Authorization: Bearer``; event streams get short-lived stream tokens), so the page
adds no endpoint and no cookie, and there is nothing for a cross-site request to ride on.

Every response here carries a Content-Security-Policy that allows script, style, images
and connections from this origin only and no inline script: text from a job that ever
reached the DOM as markup still could not run. The page inserts such text with
``textContent`` anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR: Final = Path(__file__).parent / "static"

# 'self' only: no CDN, no inline script or style attribute, no framing (clickjacking on
# the cancel and retry buttons). Images: the page previews a generated image by fetching it
# with the token (an <img> cannot send one) and showing it from a blob: URL; an image,
# SVG included, runs no script inside an <img>.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files that change with each release: revalidate (ETag) rather than cache.
    "Cache-Control": "no-cache",
}


class _StaticFiles(StaticFiles):
    """Starlette's StaticFiles, with the dashboard's headers on every file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers=HEADERS)


def routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET"]),
        Mount("/static", _StaticFiles(directory=STATIC_DIR), name="static"),
    ]
