// The sonicrec web page: plain JavaScript over the JSON API (no build step, no external assets).
// Every text from the API goes into the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                 "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939"];
const state = {
  map: null,          // {ids, x, y, split, group, title, method, n_songs}
  colours: new Map(), // group -> colour
  selected: null,     // track id
  similar: new Set(), // ids highlighted as the selected track's playlist ("Similar songs")
  recs: new Set(),    // ids highlighted as a user's recommendations
  upload: null,       // {x, y} where the last upload landed
  uploadSimilar: new Set(), // ids highlighted as the last upload's neighbours ("Sounds like")
  hover: -1,
};
const MAX_QUERY = 200; // the API's longest search text

// --- API ---------------------------------------------------------------------------------------

// A readable sentence from an error body: FastAPI's validation errors are a list of {loc, msg}.
function errorText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).slice(-1)[0] || "request"}: ${d.msg || "invalid"}`).join("; ");
  }
  return "";
}

async function api(path, params = {}, options = {}) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = errorText(body.detail);
    throw new Error(detail || `the server answered ${response.status} ${response.statusText}`);
  }
  return body;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

// --- lists -------------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function songLabel(hit) {
  return [hit.title || hit.track_id, hit.artist].filter(Boolean).join(" — ");
}

// One song row: play button, title, collection, cold badge and score.
function songItem(hit, { score = true } = {}) {
  const li = el("li", "song");
  li.dataset.id = hit.track_id;
  const play = el("button", "play", "▶");
  play.title = "play and show similar songs";
  play.addEventListener("click", () => selectTrack(hit.track_id, true));
  li.append(play);
  const text = el("span", "label");
  text.append(el("span", "title", songLabel(hit)));
  if (hit.collection) text.append(el("span", "muted small", ` ${hit.collection}`));
  li.append(text);
  if (hit.cold) {
    const badge = el("span", "badge cold", "cold");
    badge.title = `never played (${hit.split}): placed by its sound alone`;
    li.append(badge);
  }
  if (score && typeof hit.score === "number") li.append(el("span", "score", hit.score.toFixed(3)));
  return li;
}

function fill(list, items) {
  list.replaceChildren(...items);
}

// --- tracks ------------------------------------------------------------------------------------

async function search(q) {
  try {
    const body = await api("/api/search", { q: q.slice(0, MAX_QUERY), limit: 30 });
    fill($("search-results"), body.results.map((t) => songItem({ ...t, cold: false }, { score: false })));
    if (!body.results.length) $("search-results").append(el("li", "muted", "no match"));
  } catch (error) {
    showError(error);
  }
}

async function selectTrack(id, autoplay) {
  showError(null);
  try {
    const [track, similar] = await Promise.all([
      api("/api/track", { id }),
      api("/api/similar", { id, n: 12 }),
    ]);
    state.selected = id;
    $("now-title").textContent = songLabel(track);
    const meta = track.meta || {};
    $("now-meta").textContent = [track.collection, meta.style, meta.key, meta.meter,
      track.split && (track.split === "train" ? "played (CF factors)" : `cold: ${track.split}`)]
      .filter(Boolean).join(" · ");
    fill($("similar"), similar.results.slice(1).map((hit) => songItem(hit)));
    state.similar = new Set(similar.results.map((h) => h.track_id));
    drawMap();
    play(track, autoplay);
  } catch (error) {
    showError(error);
  }
}

function play(track, autoplay) {
  const player = $("player");
  player.dataset.state = "loading";
  player.dataset.track = track.track_id;
  if (!track.audio_url) {
    player.removeAttribute("src");
    player.dataset.state = "no audio";
    return;
  }
  player.src = track.audio_url;
  player.preload = "auto";
  player.addEventListener("loadedmetadata", () => {
    if (track.excerpt_start && track.excerpt_start < player.duration) player.currentTime = track.excerpt_start;
  }, { once: true });
  if (autoplay) player.play().catch(() => { player.dataset.state = "press play"; });
}

// --- users -------------------------------------------------------------------------------------

// The picker offers the users whose id contains what is typed (the server filters all of them).
async function loadUsers(q = "") {
  const body = await api("/api/users", { q: q.slice(0, MAX_QUERY), limit: 100 });
  fill($("user-list"), body.results.map((u) => { const o = el("option"); o.value = u; return o; }));
  $("user-list").dataset.query = q;
  if (!q && body.results.length) $("user").placeholder = `user id (${body.total} users), e.g. ${body.results[0]}`;
}

async function recommend(user) {
  showError(null);
  try {
    const body = await api("/api/recommend", { user, n: 20 });
    fill($("recs"), body.results.map((hit) => songItem(hit)));
    state.recs = new Set(body.results.map((h) => h.track_id));
    drawMap();
  } catch (error) {
    fill($("recs"), []);  // never leave another user's list under this user's name
    state.recs = new Set();
    drawMap();
    showError(error);
  }
}

// --- uploads -----------------------------------------------------------------------------------

async function upload(file) {
  showError(null);
  const status = $("upload-status");
  status.textContent = `placing ${file.name}…`;
  $("upload-results").hidden = true;
  const form = new FormData();
  form.append("file", file);
  try {
    const body = await api("/api/upload", { n: 10 }, { method: "POST", body: form });
    status.textContent = `${body.filename}: placed by its sound (${body.factors.length} factors)`;
    if (body.familiarity && !body.familiarity.familiar) {
      status.textContent += ` — ${body.familiarity.message}`;  // far from the model's training songs
      status.classList.add("warning");
    } else {
      status.classList.remove("warning");
    }
    $("upload-player").src = URL.createObjectURL(file);
    fill($("upload-similar"), body.similar.map((hit) => songItem(hit)));
    fill($("upload-audience"), body.audience.map((u) => {
      const li = el("li", "user");
      const button = el("button", "link", u.user_id);
      button.title = "show this user's recommendations";
      button.addEventListener("click", () => { $("user").value = u.user_id; recommend(u.user_id); });
      li.append(button, el("span", "score", u.score.toFixed(3)));
      return li;
    }));
    $("upload-results").hidden = false;
    state.upload = body.map;
    state.uploadSimilar = new Set(body.similar.map((h) => h.track_id));
    drawMap();
  } catch (error) {
    status.textContent = "";
    state.upload = null;  // the star and rings of an earlier upload would belong to this one
    state.uploadSimilar = new Set();
    drawMap();
    showError(error);
  }
}

function setUpUploads() {
  const drop = $("drop");
  $("upload-input").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
}

// --- the map -----------------------------------------------------------------------------------

function mapGeometry(canvas) {
  const m = state.map;
  const pad = 14;
  const xs = m.x, ys = m.y;
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (state.upload) {
    x0 = Math.min(x0, state.upload.x); x1 = Math.max(x1, state.upload.x);
    y0 = Math.min(y0, state.upload.y); y1 = Math.max(y1, state.upload.y);
  }
  const w = canvas.clientWidth, h = canvas.clientHeight;
  const sx = (w - 2 * pad) / ((x1 - x0) || 1), sy = (h - 2 * pad) / ((y1 - y0) || 1);
  return { px: (x) => pad + (x - x0) * sx, py: (y) => h - pad - (y - y0) * sy };
}

function drawMap() {
  const canvas = $("map");
  const m = state.map;
  if (!m) return;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = canvas.clientWidth * ratio;
  canvas.height = canvas.clientHeight * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, canvas.clientWidth, canvas.clientHeight);
  const { px, py } = mapGeometry(canvas);
  const dot = (i, r) => { ctx.beginPath(); ctx.arc(px(m.x[i]), py(m.y[i]), r, 0, 2 * Math.PI); };
  for (let i = 0; i < m.ids.length; i++) {
    dot(i, 3);
    ctx.fillStyle = state.colours.get(m.group[i]) || "#999";
    ctx.globalAlpha = m.split[i] === "train" ? 0.75 : 0.45;
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  for (let i = 0; i < m.ids.length; i++) {
    const id = m.ids[i];
    if (state.recs.has(id)) { dot(i, 5); ctx.strokeStyle = "#2a9d8f"; ctx.lineWidth = 2; ctx.stroke(); }
    if (state.similar.has(id)) { dot(i, 5); ctx.strokeStyle = "#111"; ctx.lineWidth = 1.5; ctx.stroke(); }
    if (state.uploadSimilar.has(id)) {
      dot(i, 6); ctx.strokeStyle = "#e63946"; ctx.lineWidth = 1.5; ctx.setLineDash([3, 2]); ctx.stroke();
      ctx.setLineDash([]);
    }
    if (id === state.selected) { dot(i, 8); ctx.strokeStyle = "#e63946"; ctx.lineWidth = 3; ctx.stroke(); }
  }
  if (state.hover >= 0) { dot(state.hover, 6); ctx.strokeStyle = "#333"; ctx.lineWidth = 1; ctx.stroke(); }
  if (state.upload) {
    const [x, y] = [px(state.upload.x), py(state.upload.y)];
    ctx.fillStyle = "#e63946"; ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
    ctx.beginPath();
    for (let k = 0; k < 10; k++) {
      const r = k % 2 ? 5 : 12, a = Math.PI / 2 + (k * Math.PI) / 5;
      ctx.lineTo(x + r * Math.cos(a), y - r * Math.sin(a));
    }
    ctx.closePath(); ctx.stroke(); ctx.fill();
  }
  canvas.dataset.upload = state.upload ? "shown" : "";
}

function nearestPoint(event) {
  const canvas = $("map");
  const rect = canvas.getBoundingClientRect();
  const [mx, my] = [event.clientX - rect.left, event.clientY - rect.top];
  const { px, py } = mapGeometry(canvas);
  let best = -1, bestD = 64; // within 8 px
  for (let i = 0; i < state.map.ids.length; i++) {
    const d = (px(state.map.x[i]) - mx) ** 2 + (py(state.map.y[i]) - my) ** 2;
    if (d < bestD) { best = i; bestD = d; }
  }
  return { index: best, mx, my };
}

function setUpMap() {
  const canvas = $("map");
  const tip = $("tooltip");
  canvas.addEventListener("mousemove", (event) => {
    if (!state.map) return;
    const { index, mx, my } = nearestPoint(event);
    if (index !== state.hover) { state.hover = index; drawMap(); }
    tip.hidden = index < 0;
    if (index >= 0) {
      const m = state.map;
      tip.textContent = [m.title[index] || m.ids[index], m.group[index],
        m.split[index] === "train" ? "played" : `cold (${m.split[index]})`].filter(Boolean).join(" · ");
      const flip = mx + 12 + tip.offsetWidth > canvas.clientWidth;  // keep it inside the map
      tip.style.left = `${flip ? mx - 12 - tip.offsetWidth : mx + 12}px`;
      tip.style.top = `${my + 12}px`;
    }
    canvas.style.cursor = index >= 0 ? "pointer" : "default";
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; state.hover = -1; drawMap(); });
  canvas.addEventListener("click", (event) => {
    if (!state.map) return;
    const { index } = nearestPoint(event);
    if (index >= 0) selectTrack(state.map.ids[index], true);
  });
  window.addEventListener("resize", drawMap);
}

async function loadMap() {
  const m = await api("/api/map");
  state.map = m;
  const groups = [...new Set(m.group.filter(Boolean))].sort();
  groups.forEach((g, i) => state.colours.set(g, i < PALETTE.length ? PALETTE[i] : "#999"));
  const sample = m.ids.length < m.n_songs ? `, ${m.ids.length} of ${m.n_songs} songs shown` : "";
  $("map-method").textContent = `(${m.method}${sample})`;
  fill($("legend"), groups.slice(0, PALETTE.length).map((g) => {
    const item = el("span", "key");
    const swatch = el("span", "swatch");
    swatch.style.background = state.colours.get(g);
    item.append(swatch, document.createTextNode(g));
    return item;
  }));
  drawMap();
}

// --- start -------------------------------------------------------------------------------------

async function start() {
  const player = $("player");
  for (const name of ["playing", "pause", "ended", "error"]) {
    player.addEventListener(name, () => { player.dataset.state = name; });
  }
  let timer = null;
  $("search").addEventListener("input", (e) => {
    clearTimeout(timer);
    timer = setTimeout(() => search(e.target.value), 200);
  });
  let userTimer = null;
  $("user").addEventListener("input", (e) => {
    clearTimeout(userTimer);
    userTimer = setTimeout(() => loadUsers(e.target.value.trim()).catch(showError), 150);
  });
  $("user-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("user").value) recommend($("user").value.trim());
  });
  setUpUploads();
  setUpMap();
  try {
    const info = await api("/api/info");
    $("run-info").textContent = `run ${info.run} · model ${info.model} · ${info.n_warm_songs} played + `
      + `${info.n_cold_songs} cold songs · ${info.n_users} users`;
    $("upload-limits").textContent = `(${info.upload_formats}, up to ${info.max_upload_mb} MB)`;
    $("analysis-link").hidden = !info.analysis_url;
    await Promise.all([search(""), loadUsers(), loadMap()]);
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(error);
  }
}

start();
