// The search page: plain DOM and Leaflet (served by this service, as is the basemap), nothing from the network but
// this service's own API, unless the service was started with an online basemap.
// Paths are relative, so the page also works behind a route prefix (served at <prefix>/).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { hits: [], box: null, selected: null, drawing: false, drag: null };
const map = { leaflet: null, footprints: [], box: null, deepest: 6 };

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
function rings(wkt) {
  // every innermost "( x y, x y, … )" of a POLYGON / MULTIPOLYGON is one ring of lon/lat pairs
  return [...wkt.matchAll(/\(([^()]+)\)/g)].map((m) =>
    m[1].split(",").map((pair) => pair.trim().split(/\s+/).map(Number)));
}

const latLngs = (ring) => ring.map(([lon, lat]) => [lat, lon]);

function highlight(i, on) {
  (map.footprints[i] || []).forEach((polygon) => {
    const element = polygon.getElement();
    if (element) element.classList.toggle("hover", on);
  });
  const card = document.querySelectorAll(".hit")[i];
  if (card) card.classList.toggle("hover", on);
}

function drawFootprints() {
  map.footprints.flat().forEach((polygon) => polygon.remove());
  map.footprints = state.hits.map((hit, i) => (hit.footprint ? rings(hit.footprint) : []).map((ring) => {
    const polygon = L.polygon(latLngs(ring), {
      className: "footprint" + (state.selected === i ? " selected" : ""),
    }).addTo(map.leaflet);
    polygon.bindTooltip(`#${hit.rank} ${hit.image_id}`);
    polygon.on("click", () => select(i));
    polygon.on("mouseover", () => highlight(i, true));
    polygon.on("mouseout", () => highlight(i, false));
    return polygon;
  }));
}

function drawBox() {
  if (map.box) map.box.remove();
  map.box = null;
  if (!state.box) return;
  const [minx, miny, maxx, maxy] = state.box;
  map.box = L.rectangle([[miny, minx], [maxy, maxx]], { className: "box", interactive: false }).addTo(map.leaflet);
}

function fitResults() {
  const polygons = map.footprints.flat();
  if (!polygons.length) return;
  // no deeper than a few levels past the basemap's own tiles, so the places around stay readable
  map.leaflet.fitBounds(L.featureGroup(polygons).getBounds(), { padding: [20, 20], maxZoom: map.deepest + 3 });
}

function setDrawing(on) {
  state.drawing = on;
  $("map").classList.toggle("drawing", on);
  $("draw-box").textContent = on ? "Drag on the map…" : "Draw box";
}

function setupBoxDrawing() {
  const m = map.leaflet;
  // before Leaflet's own handlers (capture phase): a box drag must not pan the map
  const arm = (event) => { if (state.drawing || event.shiftKey) m.dragging.disable(); };
  m.getContainer().addEventListener("pointerdown", arm, true);
  m.getContainer().addEventListener("mousedown", arm, true);
  m.on("mousedown", (event) => {
    if (state.drawing || event.originalEvent.shiftKey) state.drag = event.latlng;
  });
  m.on("mousemove", (event) => {
    if (!state.drag) return;
    const a = state.drag, b = event.latlng;
    state.box = [Math.min(a.lng, b.lng), Math.min(a.lat, b.lat), Math.max(a.lng, b.lng), Math.max(a.lat, b.lat)]
      .map((v, j) => Math.max(j % 2 ? -90 : -180, Math.min(j % 2 ? 90 : 180, v)));
    drawBox();
  });
  document.addEventListener("mouseup", () => {
    m.dragging.enable();
    if (!state.drag) return;
    state.drag = null;
    setDrawing(false);
    if (state.box) $("bbox").value = state.box.map((v) => v.toFixed(5)).join(",");
  });
}

function setupMap() {
  // boxZoom off: shift-drag draws the search box instead
  map.leaflet = L.map("map", { boxZoom: false, worldCopyJump: true, minZoom: 0 }).setView([20, 0], 1);
  setupBoxDrawing();
  $("draw-box").addEventListener("click", () => setDrawing(!state.drawing));
  $("world").addEventListener("click", () => map.leaflet.setView([20, 0], 1));
  $("fit").addEventListener("click", fitResults);
  $("clear-box").addEventListener("click", () => { state.box = null; $("bbox").value = ""; drawBox(); });
  $("bbox").addEventListener("change", () => {
    const parts = $("bbox").value.split(",").map(Number);
    state.box = parts.length === 4 && parts.every(Number.isFinite) ? parts : null;
    drawBox();
  });
}

async function addBasemap() {
  const settings = await fetch("map.json").then((r) => r.json()).catch(() => ({ tiles: null, max_zoom: 6 }));
  map.deepest = settings.max_zoom;
  if (!settings.tiles) return;
  L.tileLayer(settings.tiles, {
    maxNativeZoom: settings.max_zoom, maxZoom: 18, attribution: settings.attribution,
  }).addTo(map.leaflet);
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
    card.addEventListener("mouseenter", () => highlight(i, true));
    card.addEventListener("mouseleave", () => highlight(i, false));
    grid.append(card);
  });
  drawFootprints();
  fitResults();
}

async function select(i) {
  state.selected = i;
  document.querySelectorAll(".hit").forEach((card, j) => card.classList.toggle("selected", i === j));
  map.footprints.forEach((polygons, j) => polygons.forEach((polygon) => {
    const element = polygon.getElement();
    if (element) element.classList.toggle("selected", i === j);
  }));
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
addBasemap();
health();
setInterval(health, 30000);
// a query in the page's address (?q=…) runs at once: links to a search can be shared
const initial = new URLSearchParams(location.search);
if (initial.get("bbox")) { $("bbox").value = initial.get("bbox"); $("bbox").dispatchEvent(new Event("change")); }
if (initial.get("q")) {
  for (const name of ["q", "k", "after", "before"]) if (initial.get(name)) $(name).value = initial.get(name);
  run(searchPath(), `“${$("q").value}”`);
}
