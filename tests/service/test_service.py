"""The search service: its API on a real Ray Serve app over a real small index, bad input, the token, a hot index
swap under load, and the page in a real headless browser."""

from __future__ import annotations

import io
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import SHIFT, Browser
from PIL import Image
from waiting import wait_for

from rsitr.cli import main as cli_main
from rsitr.retrieval.index import build_index
from rsitr.retrieval.search import Searcher
from rsitr.retrieval.search_inputs import SearchFilter

QUERY = "a river crosses dense forest"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def served_index(demo_index_folder: Path, tmp_path_factory) -> Path:
    # a copy: a test here publishes a new version of it
    return Path(shutil.copytree(demo_index_folder, tmp_path_factory.mktemp("served") / "index"))


@pytest.fixture(scope="module")
def service(served_index: Path) -> Iterator[str]:
    """The service on Ray Serve at a free port of 127.0.0.1 (polling the index every second)."""
    from rsitr.service import deployment

    url = deployment.start(str(served_index), port=_free_port(), poll_seconds=1.0)
    yield url.rstrip("/")
    deployment.stop()


@pytest.fixture(scope="module")
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=60) as session:
        yield session


@pytest.mark.ray
@pytest.mark.serve
def test_health_names_the_index_and_model_versions(client: httpx.Client, served_index: Path) -> None:
    health = client.get("/healthz").json()
    searcher = Searcher(str(served_index))
    assert health["rows"] == 432 and health["caption_rows"] == searcher.meta["caption_rows"] > 0
    assert health["model_version"] == searcher.state["model_version"]
    assert health["index_version"] == searcher.meta["built_at"]


@pytest.mark.ray
@pytest.mark.serve
def test_text_search_answers_what_the_cli_answers(client: httpx.Client, served_index: Path) -> None:
    body = client.get("/search", params={"q": QUERY, "k": 6, "bbox": "-180,-90,180,90"}).json()
    expected = Searcher(str(served_index)).search(QUERY, k=6)
    assert [h["image_id"] for h in body["hits"]] == [h.image_id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert all(h["footprint"].startswith("POLYGON") and h["acquired_at"] for h in body["hits"])


@pytest.mark.ray
@pytest.mark.serve
def test_a_tile_has_metadata_a_png_thumbnail_and_neighbours(client: httpx.Client, served_index: Path) -> None:
    first = client.get("/search", params={"q": QUERY, "k": 1}).json()["hits"][0]
    tile = client.get(f"/tiles/{first['image_id']}").json()
    assert {key: tile[key] for key in ("image_id", "footprint", "acquired_at", "source_uri")} == {
        key: first[key] for key in ("image_id", "footprint", "acquired_at", "source_uri")
    }
    thumbnail = client.get(f"/tiles/{first['image_id']}/thumbnail.png")
    assert thumbnail.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(thumbnail.content)) as image:
        assert image.format == "PNG" and image.size == (128, 128)  # demo tiles are 128 px: shown as they are
    similar = client.get(f"/tiles/{first['image_id']}/similar", params={"k": 5}).json()["hits"]
    assert len(similar) == 5 and first["image_id"] not in [h["image_id"] for h in similar]
    assert all(a["score"] >= b["score"] for a, b in zip(similar, similar[1:], strict=False))


@pytest.mark.ray
@pytest.mark.serve
def test_an_uploaded_tile_finds_itself_and_captions(client: httpx.Client) -> None:
    first = client.get("/search", params={"q": "dense forest", "k": 1}).json()["hits"][0]
    png = client.get(f"/tiles/{first['image_id']}/thumbnail.png").content
    uploads = [("tile.png", png, "image/png")] * 3 + [("notes.txt", b"not an image", "text/plain")]
    with ThreadPoolExecutor(len(uploads)) as pool:  # uploads at once share an image-tower pass; a bad one fails alone
        answers = list(pool.map(lambda f: client.post("/search/image", files={"file": f}, params={"k": 3}), uploads))
    assert [a.status_code for a in answers] == [200, 200, 200, 400] and "notes.txt" in answers[3].json()["error"]
    for body in (a.json() for a in answers[:3]):
        assert body["tiles"][0]["image_id"] == first["image_id"]
        assert body["tiles"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert len(body["captions"]) == 3 and all(c["caption"] for c in body["captions"])


@pytest.mark.ray
@pytest.mark.serve
def test_concurrent_queries_are_answered_in_batches_as_each_alone(client: httpx.Client, served_index: Path) -> None:
    queries = [f"{place} beside {land}" for place in ("a lake", "a river", "a road", "houses") for land in
               ("dense forest", "farmland", "bare land", "a playground")]  # fmt: skip
    asked = [{"q": q, "k": 5, **({"bbox": "-180,-90,0,90"} if i % 2 else {})} for i, q in enumerate(queries)]
    searcher = Searcher(str(served_index))
    before = client.get("/healthz").json()["batches"]["text"]
    with ThreadPoolExecutor(len(asked) + 1) as pool:
        bad = pool.submit(client.get, "/search", params={"q": " "})
        answers = list(pool.map(lambda params: client.get("/search", params=params), asked))
    assert bad.result().status_code == 400  # refused alone, before it could join a batch
    for params, response in zip(asked, answers, strict=True):
        assert response.status_code == 200, response.text
        where = SearchFilter(bbox=(-180, -90, 0, 90)) if "bbox" in params else None
        alone = searcher.search(params["q"], 5, where)
        hits = response.json()["hits"]
        assert [h["image_id"] for h in hits] == [h.image_id for h in alone]
        assert [h["score"] for h in hits] == pytest.approx([h.score for h in alone], abs=1e-3)
    after = client.get("/healthz").json()["batches"]["text"]
    assert after["queries"] - before["queries"] == len(asked)
    assert after["batches"] - before["batches"] < len(asked)  # some queries shared a text-tower pass


@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("get", "/search", {"params": {"q": "  "}}, 400, "empty query"),
        ("get", "/search", {"params": {"q": "forest", "k": 0}}, 400, "between 1 and 1000"),
        ("get", "/search", {"params": {"q": "forest", "k": 5000}}, 400, "between 1 and 1000"),
        ("get", "/search", {"params": {"q": "forest", "k": "ten"}}, 422, "k: "),
        ("get", "/search", {"params": {"q": "forest", "bbox": "1,2,3"}}, 400, "expected four numbers"),
        ("get", "/search", {"params": {"q": "forest", "bbox": "10,0,5,1"}}, 400, "min <= max"),
        ("get", "/search", {"params": {"q": "forest", "after": "yesterday"}}, 400, "expected an ISO date"),
        ("get", "/search", {"params": {"q": "f", "after": "2024-02-01", "before": "2024-01-01"}}, 400, "is not before"),
        ("get", "/tiles/demo/no-such-tile", {}, 404, "no tile 'demo/no-such-tile'"),
        ("get", "/tiles/..%2F..%2Fetc%2Fpasswd/thumbnail.png", {}, 404, "no tile '../../etc/passwd'"),
        ("get", "/tiles/x' OR '1'='1/thumbnail.png", {}, 404, "no tile"),
        ("post", "/search/image", {"files": {"file": ("notes.txt", b"not an image", "text/plain")}}, 400, "notes.txt"),
        ("post", "/search/image", {"files": {"file": ("big.png", b"0" * (21 << 20), "image/png")}}, 413, "limit"),
        ("post", "/search/image", {}, 422, "file: "),
    ],
)
def test_bad_input_gets_a_4xx_with_a_one_line_reason(
    client: httpx.Client, method: str, path: str, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.request(method.upper(), path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error


@pytest.mark.ray
@pytest.mark.serve
def test_page_docs_and_their_assets_come_from_the_service(client: httpx.Client) -> None:
    page = client.get("/").text
    assert '<form id="search-form"' in page and "https://" not in page
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn." not in docs
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]


@pytest.mark.ray
@pytest.mark.serve
def test_the_map_library_and_an_offline_basemap_come_from_the_service(client: httpx.Client) -> None:
    page = client.get("/").text
    assert 'src="leaflet/leaflet.js"' in page and 'href="leaflet/leaflet.css"' in page
    assert client.get("/leaflet/leaflet.js").status_code == 200
    settings = client.get("/map.json").json()
    assert settings["tiles"] == "basemap/{z}/{x}/{y}.png" and "OpenStreetMap" in settings["attribution"]
    world = client.get("/basemap/0/0/0.png")
    assert world.status_code == 200 and world.content.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(world.content)) as tile:
        assert tile.size == (256, 256)
    # zoom 6 is the deepest packaged; a tile outside the world or a path that is not numbers names no file
    assert client.get("/basemap/6/63/63.png").status_code == 200
    for path, status in [("/basemap/7/0/0.png", 404), ("/basemap/1/2/0.png", 404), ("/basemap/1/a/0.png", 422)]:
        response = client.get(path)
        assert response.status_code == status and "\n" not in response.json()["error"], path


def test_an_online_basemap_must_be_an_xyz_template_with_its_credit() -> None:
    from rsitr.errors import ConfigError
    from rsitr.service.basemap import BasemapSettings

    online = BasemapSettings("https://tiles.example.org/{z}/{x}/{y}.png", "© Example")
    assert online.page_config(packaged=True) == {
        "tiles": "https://tiles.example.org/{z}/{x}/{y}.png", "attribution": "© Example", "max_zoom": 19
    }  # fmt: skip
    with pytest.raises(ConfigError, match="XYZ template"):
        BasemapSettings("file:///etc/passwd", "x")
    with pytest.raises(ConfigError, match="--basemap-attribution"):
        BasemapSettings("https://tiles.example.org/{z}/{x}/{y}.png")


@pytest.mark.ray
@pytest.mark.serve
def test_a_token_guards_every_route_that_reads_the_index(service: str, served_index: Path) -> None:
    from ray import serve

    from rsitr.service.deployment import application, required_digest

    serve.run(
        application(str(served_index), digest=required_digest("0.0.0.0", "s3cret"), poll_seconds=0),
        name="guarded",
        route_prefix="/guarded",
    )
    try:
        with httpx.Client(base_url=f"{service}/guarded", timeout=60) as guarded:
            assert guarded.get("/healthz").status_code == 401
            wrong = guarded.get("/search", params={"q": QUERY}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "s3cret" not in wrong.text
            right = guarded.get("/search", params={"q": QUERY}, headers={"Authorization": "Bearer s3cret"})
            assert right.status_code == 200 and right.json()["hits"]
            assert guarded.get("/").status_code == 200  # the page itself holds nothing of the index
            assert guarded.get("/map.json").status_code == 200  # nor does its map
            assert guarded.get("/basemap/0/0/0.png").status_code == 200
    finally:
        serve.delete("guarded")


def test_serving_beyond_loopback_needs_a_token(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("RSITR_API_TOKEN", raising=False)
    assert cli_main(["serve", "--index", "nowhere", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "RSITR_API_TOKEN" in error and "\n" not in error


@pytest.mark.ray
@pytest.mark.serve
def test_a_missing_index_or_checkpoint_stops_rsitr_serve_in_one_line(
    served_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in (
        (["--index", str(tmp_path / "nowhere")], "no index"),
        (["--index", str(served_index), "--checkpoint", str(tmp_path / "no-run")], "not a checkpoint"),
    ):
        assert cli_main(["serve", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error


@pytest.mark.ray
@pytest.mark.serve
def test_rsitr_serve_prints_its_url_answers_and_stops_on_ctrl_c(served_index: Path) -> None:
    port = _free_port()
    command = [str(Path(sys.executable).with_name("rsitr")), "serve", "--index", str(served_index), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        deadline, url = time.monotonic() + 300, None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "rsitr search is serving" in line:
                url = line.split(" at ")[1].split()[0]
        assert url == f"http://127.0.0.1:{port}/", f"no URL printed; exit status {process.poll()}"
        assert httpx.get(f"{url}healthz", timeout=60).json()["rows"] == 432
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}healthz", timeout=10)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.ray
@pytest.mark.serve
def test_a_new_index_version_is_served_without_a_failed_request(
    client: httpx.Client, served_index: Path, untrained_checkpoint: Path
) -> None:
    before = client.get("/healthz").json()
    errors: list[str] = []
    answered = [0]
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            response = client.get("/search", params={"q": QUERY, "k": 5})
            if response.status_code != 200:
                errors.append(response.text)
            answered[0] += 1

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_for("the first queries", lambda: answered[0] >= 10, 120)
        build_index(  # a re-index publishes a new version of the same index
            str(served_index / "embeddings.parquet"), str(served_index), str(untrained_checkpoint)
        )
        wait_for("swap", lambda: client.get("/healthz").json()["index_version"] != before["index_version"], 120)
        seen = answered[0]
        wait_for("queries after the swap", lambda: answered[0] >= seen + 10, 120)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    after = client.get("/healthz").json()
    assert after["swaps"] >= 1 and after["caption_rows"] == 0  # the new version was built without captions
    assert errors == []


# the browser test's picture of the page, kept for a person to look at
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".rsitr" / "screenshots"


@pytest.mark.browser
@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_searches_and_draws_results_in_a_real_browser(service: str, tmp_path: Path) -> None:
    url = f"{service}/?q=dense+forest&k=8"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True)
    assert dom.stdout.count('class="hit') == 8
    assert dom.stdout.count('class="footprint') >= 8
    assert dom.stdout.count('src="blob:') == 8  # every thumbnail was fetched and shown
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with Browser(tmp_path / "profile") as page:
        page.open(url)
        count = "document.querySelectorAll"
        wait_for("the results and their footprints", lambda: page.evaluate(
            f"{count}('.hit').length === 8 && {count}('path.footprint').length >= 8"), 120)  # fmt: skip
        # the packaged basemap drew (tiles served by the service itself), and the map zoomed to the results
        wait_for("basemap tiles", lambda: page.evaluate(f"{count}('img.leaflet-tile-loaded').length") > 0, 120)
        assert page.evaluate("map.leaflet.getZoom()") > 3
        # a result card and its footprint light up together
        page.evaluate("document.querySelector('.hit').dispatchEvent(new MouseEvent('mouseenter'))")
        assert page.evaluate(f"{count}('path.footprint.hover').length") >= 1
        # a box dragged on the map (shift held) fills the bbox field, inside the map's view
        left, top, width, height = page.evaluate(
            "(({left, top, width, height}) => [left, top, width, height])($('map').getBoundingClientRect())"
        )
        page.drag((left + width * 0.25, top + height * 0.3), (left + width * 0.7, top + height * 0.75), SHIFT)
        minx, miny, maxx, maxy = map(float, page.evaluate("$('bbox').value").split(","))
        view = page.evaluate("(b => [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()])(map.leaflet.getBounds())")
        assert view[0] < minx < maxx < view[2] and view[1] < miny < maxy < view[3]
        assert page.evaluate(f"{count}('path.box').length") == 1
        shot = page.screenshot(SCREENSHOTS / "search-page.png")
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        assert len(image.convert("RGB").resize((64, 64)).getcolors(4096) or []) > 50  # a map and thumbnails, not blank
