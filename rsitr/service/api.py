"""The search service's HTTP API and web page (FastAPI). Bad input gets a 4xx with ``{"error": "<one line>"}``, from
the same checks the CLI applies (:mod:`rsitr.retrieval.search`)."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import asdict
from importlib import resources
from typing import Any

import swagger_ui_bundle
import torch
from fastapi import FastAPI, File, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from rsitr.retrieval.search import CaptionHit, Hit, Searcher, tile_fields
from rsitr.retrieval.search_inputs import SearchError, TextQuery, check_k, parse_filter
from rsitr.service.basemap import BasemapSettings, PackagedTiles, leaflet_folder, packaged_mbtiles
from rsitr.service.batches import QueryBatches
from rsitr.service.security import token_digest
from rsitr.service.state import TileNotFoundError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# what answers without a token: the page, its map and the API's description, which hold no data of the index
PUBLIC_PATHS = ("/", "/docs", "/openapi.json", "/map.json")
PUBLIC_PREFIXES = ("/static/", "/docs-assets/", "/leaflet/", "/basemap/")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(err: RequestValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


def create_app(
    queries: QueryBatches, required_token_digest: str | None = None, basemap: BasemapSettings | None = None
) -> FastAPI:
    """The API over ``queries.service``, its searches batched by ``queries``. With ``required_token_digest`` every
    route but the page, its map and the API description requires ``Authorization: Bearer <token>`` whose SHA-256 is
    that digest. ``basemap``: what the page's map draws under the results (default: the packaged offline tiles)."""
    app = FastAPI(
        title="rsitr search",
        description="Text → tiles and image → captions/tiles over a remote-sensing index.",
        docs_url=None,  # served below from the packaged Swagger UI: the page works with no internet
    )
    app.mount("/static", StaticFiles(directory=str(resources.files("rsitr.service") / "static")), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    _answer_errors_in_one_line(app)
    app.add_middleware(Guard, required_token_digest=required_token_digest)
    _add_pages(app)
    _add_map(app, basemap or BasemapSettings())
    _add_searches(app, queries)
    _add_tiles(app, queries)
    return app


def _answer_errors_in_one_line(app: FastAPI) -> None:
    @app.exception_handler(SearchError)
    async def bad_query(_: Request, err: SearchError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(TileNotFoundError)
    async def unknown_tile(_: Request, err: TileNotFoundError) -> JSONResponse:
        return _error(404, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(err))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))


class Guard:
    """The bearer token (when one is required) and the upload size limit, checked before any route runs (plain
    ASGI: a refused request never reaches the app, an admitted one passes through untouched)."""

    def __init__(self, app: ASGIApp, required_token_digest: str | None) -> None:
        self.app = app
        self.required_token_digest = required_token_digest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        root = scope.get("root_path", "")  # a Serve route prefix, e.g. /search-app
        path = str(scope["path"]).removeprefix(root) or "/"
        digest = self.required_token_digest
        if digest and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            scheme, _, presented = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(presented), digest):
                return _error(401, "a bearer token is required: Authorization: Bearer <token>", CHALLENGE)
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD_BYTES:
            return _error(413, f"upload of {int(length)} bytes is over the {MAX_UPLOAD_BYTES} byte limit")
        return None


def _add_pages(app: FastAPI) -> None:
    """The web page and the API's own description (no token needed: they hold no data of the index)."""

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((resources.files("rsitr.service") / "static" / "index.html").read_text())

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title="rsitr search API",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-assets/favicon-32x32.png",
        )


def _add_map(app: FastAPI, basemap: BasemapSettings) -> None:
    """Leaflet's files, the page's map settings and the packaged basemap tiles (read from the package only)."""
    leaflet = leaflet_folder()
    if leaflet is not None:
        app.mount("/leaflet", StaticFiles(directory=str(leaflet)), name="leaflet")
    mbtiles = packaged_mbtiles()
    tiles = PackagedTiles(mbtiles) if mbtiles is not None and basemap.url is None else None

    @app.get("/map.json", include_in_schema=False)
    def map_config() -> dict[str, Any]:
        return basemap.page_config(packaged=tiles is not None)

    @app.get("/basemap/{z}/{x}/{y}.png", response_class=Response, include_in_schema=False)
    def basemap_tile(z: int, x: int, y: int) -> Response:
        png = tiles.tile(z, x, y) if tiles is not None else None
        if png is None:
            raise HTTPException(404, f"no basemap tile {z}/{x}/{y}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


def _add_searches(app: FastAPI, queries: QueryBatches) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """The index version, model version and row counts being served, and the query batches run so far."""
        return {**queries.service.health(), "batches": queries.counts()}

    @app.get("/search")
    async def search(
        q: str = Query("", description="what to look for, e.g. 'storage tanks beside a river'"),
        k: int = Query(10, description="how many tiles"),
        bbox: str | None = Query(None, description="minlon,minlat,maxlon,maxlat (degrees)"),
        after: str | None = Query(None, description="acquired at or after (ISO date)"),
        before: str | None = Query(None, description="acquired before (ISO date)"),
        rerank: int = Query(0, description="re-rank this many candidates against the captions (0: off)"),
    ) -> dict[str, Any]:
        """Text → tiles."""
        searcher, hits = await queries.search(
            TextQuery(q, k, parse_filter(bbox, after, before, ("after", "before")), rerank)
        )
        return {"query": q, "index_version": searcher.meta["built_at"], "hits": [asdict(h) for h in hits]}

    @app.post("/search/image")
    async def search_image(
        file: UploadFile = File(..., description="an image tile (PNG, JPEG, TIFF, …)"),  # noqa: B008
        k: int = Query(10, description="how many captions and tiles"),
    ) -> dict[str, Any]:
        """Image → captions of the index (when it has a caption table) and similar tiles."""
        check_k(k, 0)
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload {file.filename!r} is over the {MAX_UPLOAD_BYTES} byte limit")
        searcher, vector = await queries.encode_image(data, repr(file.filename or "upload"))
        captions, tiles = await asyncio.to_thread(_neighbours, searcher, vector, k)
        return {
            "index_version": searcher.meta["built_at"],
            "captions": [asdict(c) for c in captions] if captions is not None else None,
            "tiles": [asdict(h) for h in tiles],
        }


def _neighbours(searcher: Searcher, vector: torch.Tensor, k: int) -> tuple[list[CaptionHit] | None, list[Hit]]:
    """An image embedding's nearest captions (when the index has a caption table) and tiles."""
    captions = searcher.captions_for_vector(vector, k) if searcher.captions is not None else None
    return captions, searcher.similar_tiles(vector, k)


def _add_tiles(app: FastAPI, queries: QueryBatches) -> None:
    @app.get("/tiles/{image_id:path}/thumbnail.png", response_class=Response)
    def thumbnail(image_id: str) -> Response:
        """A PNG thumbnail of an indexed tile."""
        return Response(
            queries.service.thumbnail(image_id), media_type="image/png", headers={"Cache-Control": "max-age=300"}
        )

    @app.get("/tiles/{image_id:path}/similar")
    def similar(image_id: str, k: int = Query(10, description="how many tiles")) -> dict[str, Any]:
        """More like this: the tiles nearest an indexed tile's embedding."""
        searcher = queries.service.searcher
        row = queries.service.tile(image_id, searcher)
        return {
            "image_id": image_id,
            "index_version": searcher.meta["built_at"],
            "hits": [asdict(h) for h in searcher.similar_tiles(row["vector"], k, exclude=image_id)],
        }

    @app.get("/tiles/{image_id:path}")
    def tile(image_id: str) -> dict[str, Any]:
        """An indexed tile's metadata: source, window, footprint, acquisition time."""
        return tile_fields(queries.service.tile(image_id))
