// The search page: plain DOM and SVG, no library and nothing from the network but this service's own API.
// Paths are relative, so the page also works behind a route prefix (served at <prefix>/).
"use strict";

const W = 480, H = 240;
const WORLD = { minx: -180, miny: -90, maxx: 180, maxy: 90 };
const $ = (id) => document.getElementById(id);
const state = { view: { ...WORLD }, hits: [], box: null, selected: null, drag: null };
const SVG_NS = "http://www.w3.org/2000/svg";

function headers() {
  const token = sessionStorage.getItem("rsitr-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) {
    if (response.status === 401) $("token-box").open = true;
    throw new Error(body.error || `HTTP ${response.status}`);
  }
  return body;
}

async function thumbnailInto(img, imageId) {
  const response = await fetch(`tiles/${encodeURI(imageId)}/thumbnail.png`, { headers: headers() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
  else img.alt = "no thumbnail";
}

// --- map ------------------------------------------------------------------------------------------------------
function project([lon, lat]) {
  const v = state.view;
  return [((lon - v.minx) / (v.maxx - v.minx)) * W, ((v.maxy - lat) / (v.maxy - v.miny)) * H];
}

function unproject(x, y) {
  const v = state.view;
  return [v.minx + (x / W) * (v.maxx - v.minx), v.maxy - (y / H) * (v.maxy - v.miny)];
}

function rings(wkt) {
  // every innermost "( x y, x y, … )" of a POLYGON / MULTIPOLYGON is one ring
  return [...wkt.matchAll(/\(([^()]+)\)/g)].map((m) =>
    m[1].split(",").map((pair) => pair.trim().split(/\s+/).map(Number)));
}

function svg(name, attrs) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function step(span) {
  for (const s of [30, 10, 5, 1, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001]) if (span / s >= 3) return s;
  return 0.0005;
}

function drawMap() {
  const map = $("map");
  map.replaceChildren();
  const v = state.view;
  const s = step(Math.max(v.maxx - v.minx, v.maxy - v.miny));
  const lines = [];
  for (let lon = Math.ceil(v.minx / s) * s; lon <= v.maxx; lon += s) lines.push([[lon, v.miny], [lon, v.maxy]]);
  for (let lat = Math.ceil(v.miny / s) * s; lat <= v.maxy; lat += s) lines.push([[v.minx, lat], [v.maxx, lat]]);
  const grid = lines.map(([a, b]) => `M${project(a).join(",")}L${project(b).join(",")}`).join("");
  map.append(svg("path", { d: grid, class: "graticule" }));
  state.hits.forEach((hit, i) => {
    if (!hit.footprint) return;
    for (const ring of rings(hit.footprint)) {
      const polygon = svg("polygon", {
        points: ring.map((p) => project(p).join(",")).join(" "),
        class: "footprint" + (state.selected === i ? " selected" : ""),
      });
      const title = svg("title", {});
      title.textContent = `#${hit.rank} ${hit.image_id}`;
      polygon.append(title);
      polygon.addEventListener("click", () => select(i));
      map.append(polygon);
    }
  });
  if (state.box) {
    const [x0, y0] = project([state.box[0], state.box[3]]);
    const [x1, y1] = project([state.box[2], state.box[1]]);
    map.append(svg("rect", { x: x0, y: y0, width: Math.max(x1 - x0, 1), height: Math.max(y1 - y0, 1), class: "box" }));
  }
  $("map-note").textContent =
    `lon ${v.minx.toFixed(3)} … ${v.maxx.toFixed(3)}, lat ${v.miny.toFixed(3)} … ${v.maxy.toFixed(3)} · drag: box · scroll: zoom`;
}

function fitTo(minx, miny, maxx, maxy) {
  const padX = Math.max((maxx - minx) * 0.1, 0.002), padY = Math.max((maxy - miny) * 0.1, 0.002);
  [minx, maxx, miny, maxy] = [minx - padX, maxx + padX, miny - padY, maxy + padY];
  const cx = (minx + maxx) / 2, cy = (miny + maxy) / 2;
  const half = Math.max((maxx - minx) / 2, (maxy - miny)); // keep the map's 2:1 lon:lat shape
  state.view = { minx: cx - half, maxx: cx + half, miny: cy - half / 2, maxy: cy + half / 2 };
  drawMap();
}

function fitResults() {
  const points = state.hits.flatMap((h) => (h.footprint ? rings(h.footprint).flat() : []));
  if (!points.length) return;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  fitTo(Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys));
}

function mapPoint(event) {
  const rect = $("map").getBoundingClientRect();
  return [((event.clientX - rect.left) / rect.width) * W, ((event.clientY - rect.top) / rect.height) * H];
}

function setupMap() {
  const map = $("map");
  map.addEventListener("mousedown", (event) => { state.drag = unproject(...mapPoint(event)); });
  map.addEventListener("mousemove", (event) => {
    if (!state.drag) return;
    const [lon, lat] = unproject(...mapPoint(event));
    const [lon0, lat0] = state.drag;
    state.box = [Math.min(lon, lon0), Math.min(lat, lat0), Math.max(lon, lon0), Math.max(lat, lat0)];
    drawMap();
  });
  window.addEventListener("mouseup", () => {
    if (!state.drag) return;
    state.drag = null;
    if (state.box) $("bbox").value = state.box.map((v) => v.toFixed(5)).join(",");
  });
  map.addEventListener("wheel", (event) => {
    event.preventDefault();
    const [lon, lat] = unproject(...mapPoint(event));
    const f = event.deltaY > 0 ? 1.25 : 0.8, v = state.view;
    state.view = { minx: lon - (lon - v.minx) * f, maxx: lon + (v.maxx - lon) * f,
                   miny: lat - (lat - v.miny) * f, maxy: lat + (v.maxy - lat) * f };
    drawMap();
  }, { passive: false });
  $("world").addEventListener("click", () => { state.view = { ...WORLD }; drawMap(); });
  $("fit").addEventListener("click", fitResults);
  $("clear-box").addEventListener("click", () => { state.box = null; $("bbox").value = ""; drawMap(); });
  $("bbox").addEventListener("change", () => {
    const parts = $("bbox").value.split(",").map(Number);
    state.box = parts.length === 4 && parts.every(Number.isFinite) ? parts : null;
    drawMap();
  });
}

// --- results --------------------------------------------------------------------------------------------------
function showHits(hits, what) {
  state.hits = hits;
  state.selected = null;
  $("detail").hidden = true;
  $("status").textContent = `${hits.length} tiles — ${what}`;
  const grid = $("grid");
  grid.replaceChildren();
  hits.forEach((hit, i) => {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.imageId = hit.image_id;
    const img = document.createElement("img");
    img.alt = hit.image_id;
    thumbnailInto(img, hit.image_id);
    const caption = document.createElement("figcaption");
    const score = hit.rerank_score ?? hit.score;
    caption.innerHTML = `<b>#${hit.rank}</b> score ${score.toFixed(3)}<br><span class="id"></span><br><span class="when"></span>`;
    caption.querySelector(".id").textContent = hit.image_id;
    caption.querySelector(".when").textContent = hit.acquired_at ? hit.acquired_at.slice(0, 19) : "time unknown";
    card.append(img, caption);
    card.addEventListener("click", () => select(i));
    grid.append(card);
  });
  fitResults();
  drawMap();
}

async function select(i) {
  state.selected = i;
  document.querySelectorAll(".hit").forEach((card, j) => card.classList.toggle("selected", i === j));
  drawMap();
  const hit = state.hits[i];
  const detail = $("detail");
  detail.hidden = false;
  detail.textContent = "loading…";
  try {
    const tile = await api(`tiles/${encodeURI(hit.image_id)}`);
    const list = document.createElement("dl");
    for (const [key, value] of Object.entries(tile)) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = key;
      dd.textContent = value === null ? "—" : typeof value === "object" ? JSON.stringify(value) : String(value);
      list.append(dt, dd);
    }
    const more = document.createElement("button");
    more.id = "more-like-this";
    more.textContent = "More like this";
    more.addEventListener("click", () => run(`tiles/${encodeURI(hit.image_id)}/similar?k=${$("k").value}`,
                                             `tiles like ${hit.image_id}`));
    detail.replaceChildren(list, more);
  } catch (err) {
    detail.innerHTML = `<p class="error"></p>`;
    detail.querySelector("p").textContent = err.message;
  }
}

async function run(path, what) {
  $("status").textContent = "searching…";
  $("status").className = "note";
  try {
    const body = await api(path);
    showHits(body.hits, what);
  } catch (err) {
    $("status").textContent = err.message;
    $("status").className = "error";
  }
}

function searchPath() {
  const params = new URLSearchParams({ q: $("q").value, k: $("k").value });
  for (const name of ["bbox", "after", "before"]) if ($(name).value) params.set(name, $(name).value);
  return `search?${params}`;
}

async function health() {
  try {
    const h = await api("healthz");
    $("health").textContent = `${h.rows} tiles · model ${h.model_version} · index ${h.index_version}`;
  } catch (err) {
    $("health").textContent = err.message;
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run(searchPath(), `“${$("q").value}”`);
});
$("token").value = sessionStorage.getItem("rsitr-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("rsitr-token", $("token").value); health(); });
setupMap();
drawMap();
health();
setInterval(health, 30000);
// a query in the page's address (?q=…) runs at once: links to a search can be shared
const initial = new URLSearchParams(location.search);
if (initial.get("q")) {
  for (const name of ["q", "k", "bbox", "after", "before"]) if (initial.get(name)) $(name).value = initial.get(name);
  run(searchPath(), `“${$("q").value}”`);
}
