"""GET / (the node's status page) and GET /static/{name} (its stylesheet and script).

The page is three files of this package, served as they are: no external asset, so it works
on a farm without internet access. It holds no data itself; its script reads the node through
the API's own endpoints (status, tasks, task logs, the event stream), so each of those keeps
its own credential rule. The page asks for the credentials its most guarded content needs
(task output), so a browser is asked for them once, at the page, and sends them with every
request the page makes afterwards (Basic, the browser's own credential cache; a bearer token
as the password of the user `token`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources as package_files

import falcon

from farmnode.api.errors import ApiError
from farmnode.api.resources import Resource

HTML = "text/html"


@dataclass(frozen=True)
class Asset:
    file: str
    content_type: str


PAGE = Asset("index.html", f"{HTML}; charset=utf-8")
ASSETS: dict[str, Asset] = {
    "page.css": Asset("page.css", "text/css; charset=utf-8"),
    "page.js": Asset("page.js", "text/javascript; charset=utf-8"),
}
# Only our own files: no inline script or style, no other origin, no framing (clickjacking),
# no forms. The script reaches this origin only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def read_asset(asset: Asset) -> bytes:
    return package_files.files("farmnode.api").joinpath("static", asset.file).read_bytes()


def _send(resp: falcon.Response, asset: Asset) -> None:
    resp.content_type = asset.content_type
    resp.data = read_asset(asset)
    # Revalidated on every load: after an upgrade the page and its script match.
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("Content-Security-Policy", CSP)
    resp.set_header("X-Content-Type-Options", "nosniff")
    resp.set_header("Referrer-Policy", "no-referrer")


class Page(Resource):
    produces = (HTML,)
    output = True  # shows task output: asks for what task logs need

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send(resp, PAGE)


class Static(Resource):
    produces = ("text/css", "text/javascript")
    public = True  # the same files for everyone, no data of the node in them

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        asset = ASSETS.get(name)
        if asset is None:
            raise ApiError(404, f"no static file {name[:64]!r} (there are "
                                f"{', '.join(sorted(ASSETS))})")
        _send(resp, asset)
