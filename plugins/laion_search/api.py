"""The search service's FastAPI app, mounted in Airflow's API server at ``/laion``.

Pages: ``/laion/search``, ``/laion/reports``, ``/laion/report?run=``. JSON: ``/laion/api/...``,
described by ``/laion/openapi.json`` (``/laion/docs``). Every page and endpoint, static files
aside, needs a user of the API server's auth manager who may read laion_pipeline's runs.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from laion_search import report_page
from laion_search.catalog import DAG_ID, Run, UnknownRun
from laion_search.service import SearchService
from stages import storage
from stages.layout import RunLayout

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100
MAX_TEXT = int(os.environ.get("LAION_SEARCH_MAX_TEXT", "500"))
MAX_IMAGE_BYTES = int(os.environ.get("LAION_SEARCH_MAX_IMAGE_BYTES", str(8 << 20)))
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_TYPES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF"}
KEY_PATTERN = r"^[0-9A-Za-z_-]{1,64}$"

service = SearchService()
bearer = HTTPBearer(auto_error=False, description="An Airflow JWT (POST /auth/token), or the UI's session cookie.")


# --- auth: the API server's own --------------------------------------------------------


class LoginRequired(Exception):
    """A page was asked for without a session: send the browser to the auth manager's login."""


def may_read_runs(user: Any) -> bool:
    """Whether ``user`` may read laion_pipeline's runs, asked as Airflow's own API asks it.

    The DAG's team (its bundle's) goes with the question, so an auth manager that keeps a
    team's DAGs to that team's users is obeyed here too.
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    details = DagDetails(id=DAG_ID, team_name=DagModel.get_team_name(DAG_ID))
    return get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user)


async def run_reader(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Any:
    """The Airflow user of the request; it must be allowed to read laion_pipeline's runs."""
    from airflow.api_fastapi.core_api.security import get_user
    from starlette.concurrency import run_in_threadpool

    user = await get_user(request, None, credentials)
    # The DAG's team is read from the database (Airflow caches it) and an auth manager may
    # ask a remote service: off the event loop.
    if not await run_in_threadpool(may_read_runs, user):
        raise HTTPException(403, f"user {user.get_name()!r} may not read the runs of {DAG_ID}")
    return user


async def page_reader(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Any:
    try:
        return await run_reader(request, credentials)
    except HTTPException as exc:
        if exc.status_code == 401:
            raise LoginRequired() from exc
        raise


Reader = Annotated[Any, Depends(run_reader)]
PageReader = Annotated[Any, Depends(page_reader)]


# --- the JSON API's models -------------------------------------------------------------


class RunInfo(BaseModel):
    run_id: str = Field(description="The laion_pipeline run that last built this dataset")
    other_run_ids: list[str] = Field(description="Older successful runs that wrote the same output_root")
    output_root: str
    source: str = Field(description='"airflow" (a run of this Airflow) or "LAION_SEARCH_ROOTS"')
    end_date: str | None
    vectors: int | None = Field(description="Images in the image index")
    index_key: str | None
    recall_at_10: float | None
    has_report: bool


class SearchHit(BaseModel):
    key: str = Field(description="The sample's key in the webdataset (= metadata image_path)")
    caption: str
    url: str = Field(description="Where the image was downloaded from")
    score: float = Field(description="Inner product of normalized CLIP embeddings (cosine similarity)")
    thumbnail: str = Field(description="The image, read from its tar by byte range")


class SearchResponse(BaseModel):
    run_id: str
    query: dict[str, Any] = Field(description="kind (text, key or image) and the query")
    k: int
    took_ms: float
    results: list[SearchHit]


class LatencySummary(BaseModel):
    queries: int = Field(description="Queries answered since this API server process started")
    window: int = Field(description="The latest queries the percentiles are computed over")
    p50_ms: float | None
    p95_ms: float | None
    by_kind: dict[str, Any] = {}


class Metrics(BaseModel):
    search: LatencySummary
    loaded_runs: list[dict[str, Any]]
    encoders: list[str]
    index_reloads: int


ERRORS = {
    401: {"description": "Not authenticated: no or an expired Airflow token"},
    403: {"description": "The user may not read laion_pipeline's runs"},
    404: {"description": "No finished run with an index has this run id, or the run has no such sample"},
    413: {"description": "The image is larger than the limit (bytes or pixels)"},
    415: {"description": "The upload is not a JPEG, PNG, GIF or WebP image"},
    422: {"description": "Invalid input: k outside 1..100, text too long, not exactly one of text, key or image"},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}


# --- the app ----------------------------------------------------------------------------

app = FastAPI(
    title="laion_pipeline search",
    description=__doc__,
    version="1",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.exception_handler(LoginRequired)
async def to_login(request: Request, _: LoginRequired) -> RedirectResponse:
    from airflow.api_fastapi.app import get_auth_manager

    return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)


@app.exception_handler(UnknownRun)
async def unknown_run(request: Request, exc: UnknownRun) -> Response:
    if request.url.path.rstrip("/").endswith(("/report", "/search")) and "/api/" not in request.url.path:
        return HTMLResponse(report_page.render_message("Unknown run", str(exc), 404), status_code=404)
    return JSONResponse({"detail": str(exc)}, status_code=404)


def _thumbnail(request: Request, run_id: str, key: str) -> str:
    return str(request.url_for("sample_image").include_query_params(run=run_id, key=key))


def _run_info(run: Run) -> RunInfo:
    built = RunLayout(run.output_root).index_marker.read() or {}
    image = built.get("image", {})
    return RunInfo(
        run_id=run.run_id,
        other_run_ids=list(run.other_run_ids),
        output_root=run.output_root,
        source=run.source,
        end_date=run.end_date,
        vectors=image.get("ntotal"),
        index_key=image.get("index_key"),
        recall_at_10=image.get("recall_at_10"),
        has_report=storage.exists(RunLayout(run.output_root).report_json),
    )


@app.get("/api/runs", response_model=list[RunInfo], responses=errors(401, 403), summary="Runs that can be searched")
def list_runs(_: Reader) -> list[RunInfo]:
    runs = service.catalog.runs()
    if runs:  # the search page lists the runs first: load the one it shows while the user types
        service.warm_up(runs[0])
    return [_run_info(run) for run in runs]


def _search(request: Request, run: str, k: int, text: str | None, key: str | None, image: Any) -> SearchResponse:
    import time

    given = [name for name, value in (("text", text), ("key", key), ("image", image)) if value is not None]
    if len(given) != 1:
        raise HTTPException(422, f"give exactly one of text, key or image (got {', '.join(given) or 'none'})")
    started = time.perf_counter()
    try:
        found, hits = service.search(run, k=k, text=text, key=key, image=image)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0]) if exc.args else str(exc)) from None
    query = {"kind": given[0], **({"text": text} if text is not None else {}), **({"key": key} if key is not None else {})}
    return SearchResponse(
        run_id=found.run_id,
        query=query,
        k=k,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        results=[SearchHit(**hit.__dict__, thumbnail=_thumbnail(request, found.run_id, hit.key)) for hit in hits],
    )


RunParam = Annotated[str, Query(min_length=1, max_length=250, description="A run id from /api/runs")]
KParam = Annotated[int, Query(ge=1, le=MAX_K, description="How many results, 1..100")]


@app.get("/api/search", response_model=SearchResponse, responses=errors(401, 403, 404, 422), summary="Search by text or by a sample's key")
def search_get(
    request: Request,
    _: Reader,
    run: RunParam,
    text: Annotated[str | None, Query(min_length=1, max_length=MAX_TEXT, description="A text query")] = None,
    key: Annotated[str | None, Query(pattern=KEY_PATTERN, description="A sample key: find images like it")] = None,
    k: KParam = 10,
) -> SearchResponse:
    return _search(request, run, k, text, key, None)


@app.post("/api/search", response_model=SearchResponse, responses=errors(401, 403, 404, 413, 415, 422), summary="Search by an uploaded image (or text, or a key)")
async def search_post(
    request: Request,
    _: Reader,
    run: Annotated[str, Form(min_length=1, max_length=250)],
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    text: Annotated[str | None, Form(min_length=1, max_length=MAX_TEXT)] = None,
    key: Annotated[str | None, Form(pattern=KEY_PATTERN)] = None,
    image: Annotated[UploadFile | None, File(description=f"JPEG, PNG, GIF or WebP, at most {MAX_IMAGE_BYTES} bytes")] = None,
) -> SearchResponse:
    from starlette.concurrency import run_in_threadpool

    picture = await _read_image(image) if image is not None else None
    return await run_in_threadpool(_search, request, run, k, text, key, picture)


async def _read_image(upload: UploadFile) -> Any:
    """The upload as a PIL image, after checking its size and that it is a supported image."""
    from PIL import Image

    data = await upload.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"image is larger than {MAX_IMAGE_BYTES} bytes")
    kind = next((name for magic, name in IMAGE_TYPES.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        raise HTTPException(415, f"image must be JPEG, PNG, GIF or WebP (got {upload.content_type or 'unknown type'})")
    try:
        picture = Image.open(io.BytesIO(data))
        if picture.width * picture.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{picture.width}x{picture.height} pixels")
        picture.load()
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"image has more than {MAX_IMAGE_PIXELS} pixels ({exc})") from None
    except OSError as exc:
        raise HTTPException(415, f"cannot decode the {kind} image: {exc}") from None
    return picture


@app.get(
    "/api/image",
    name="sample_image",
    response_class=Response,
    responses={**errors(401, 403, 404), 200: {"content": {"image/jpeg": {}}, "description": "The sample's JPEG"}},
    summary="A sample's image, read from its webdataset tar by byte range",
)
def sample_image(_: Reader, run: RunParam, key: Annotated[str, Query(pattern=KEY_PATTERN)]) -> Response:
    try:
        data = service.sample_bytes(run, key, "jpg")
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0]) if exc.args else str(exc)) from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@app.get("/api/report", responses=errors(401, 403, 404), summary="A run's report.json")
def report_json(_: Reader, run: RunParam) -> dict[str, Any]:
    return _report_of(service.catalog.get(run))


def _report_of(run: Run) -> dict[str, Any]:
    report = storage.read_json_or_none(RunLayout(run.output_root).report_json)
    if report is None:
        raise HTTPException(404, f"run {run.run_id} has no report/report.json under {run.output_root}")
    return report


@app.get("/api/metrics", response_model=Metrics, responses=errors(401, 403), summary="Query latency p50/p95 and loaded indexes")
def metrics(_: Reader) -> Metrics:
    return Metrics(**service.status())


# --- pages ------------------------------------------------------------------------------


@app.get("/search", response_class=FileResponse, include_in_schema=False)
def search_page(_: PageReader) -> FileResponse:
    return FileResponse(STATIC / "search.html", media_type="text/html")


@app.get("/reports", response_class=HTMLResponse, include_in_schema=False)
def reports_page(_: PageReader) -> HTMLResponse:
    runs = [_run_info(run).model_dump() for run in service.catalog.runs()]
    return HTMLResponse(report_page.render_run_list(runs))


@app.get("/report", response_class=HTMLResponse, include_in_schema=False)
def report_page_view(request: Request, _: PageReader, run: str = "", dag_id: str = DAG_ID) -> HTMLResponse:
    if dag_id != DAG_ID:
        return HTMLResponse(report_page.render_message("No report", f"Reports exist for {DAG_ID} runs only, not {dag_id}.", 404), 404)
    found = service.catalog.get(run)
    report = _report_of(found)
    reported = str(report.get("run", {}).get("run_id", found.run_id))
    airflow_href = f"../dags/{DAG_ID}/runs/{quote(reported, safe='')}" if found.source == "airflow" else None
    html = report_page.render_report(
        report,
        run_id=run,
        samples=service.sample_rows(run, 12),
        image_url=lambda key: f"api/image?run={quote(found.run_id, safe='')}&key={quote(key)}",
        airflow_run_href=airflow_href,
        search_href=f"search?run={quote(found.run_id, safe='')}",
    )
    return HTMLResponse(html)
