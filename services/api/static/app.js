// The page at / (index.html). Served as a file of its own: the Content-Security-Policy allows
// no inline script.
"use strict";
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

async function api(method, path, body) {
  const res = await fetch(path, {method, headers: body ? {"Content-Type": "application/json"} : {}, body: body ? JSON.stringify(body) : undefined});
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error ? data.error.message : res.status + " " + res.statusText);
  return data;
}

function labels(obj) {
  return Object.entries(obj || {}).map(([k, v]) => `<span>${esc(k)}: ${esc(v)}</span>`).join("");
}

$("#search").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = $("#q").value.trim();
  const mode = $("#mode").value;
  const out = $("#results");
  if (!q) return;
  out.innerHTML = `<p class="muted">Searching…</p>`;
  try {
    const data = await api("POST", `/v1/search/${mode}`, {query: q, k: 12});
    if (!data.results.length) { out.innerHTML = `<p class="muted">No results.</p>`; return; }
    out.innerHTML = data.results.map((h) => {
      const slideId = mode === "slides" ? h.id : h.payload.slide_id;
      const text = mode === "reports" ? `<div class="report">${esc(h.payload.text)}</div>` : "";
      return `<div class="card result" data-slide="${esc(slideId)}">
        <img src="/v1/slides/${encodeURIComponent(slideId)}/thumbnail.png" alt="thumbnail of ${esc(slideId)}" loading="lazy">
        <div><div><b>${esc(h.id)}</b> <span class="score">${h.score.toFixed(3)}</span></div>
        <div class="labels">${labels(h.payload.labels)}</div>${text}</div></div>`;
    }).join("");
    out.querySelectorAll(".result").forEach((el) => el.addEventListener("click", () => openSlide(el.dataset.slide)));
  } catch (e) {
    out.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
});

let promptSets = null;
async function loadPromptSets() {
  if (!promptSets) promptSets = (await api("GET", "/v1/prompt-sets")).subtype_sets || [];
  return promptSets;
}

async function openSlide(id) {
  const box = $("#slide");
  box.innerHTML = `<p class="muted">Loading ${esc(id)}…</p>`;
  try {
    const s = await api("GET", `/v1/slides/${encodeURIComponent(id)}`);
    const sets = await loadPromptSets().catch(() => []);
    // Preselect the set that knows one of the slide's labels (a kidney slide: rcc), else the first.
    const known = new Set(Object.values(s.labels || {}));
    const fit = sets.find((p) => p.labels.some((l) => known.has(l)));
    const options = sets.map((p) => `<option value="${esc(p.name)}"${p === fit ? " selected" : ""}>${esc(p.name)} (${p.labels.map(esc).join(" / ")})</option>`).join("");
    box.innerHTML = `<h2 id="slide-title">${esc(s.id)}</h2>
      <div class="labels">${labels(s.labels)}${s.site ? `<span>site: ${esc(s.site)}</span>` : ""}${s.cohort ? `<span>cohort: ${esc(s.cohort)}</span>` : ""}</div>
      <p class="muted">${esc(s.file_name)} · ${s.tile_count ?? "?"} tiles · mpp ${s.mpp ?? "?"} · ${esc(s.state)}</p>
      <div id="viewer"><img id="overlay" src="/v1/slides/${encodeURIComponent(id)}/overlay.png" alt="tissue overlay of ${esc(id)}"><canvas id="heat"></canvas></div>
      <div class="row"><label>Prompt set <select id="pset">${options}</select></label><button id="zs">Zero-shot subtype</button></div>
      <div id="zeroshot"></div>
      <div class="row" id="head-row" hidden><label>Trained head <select id="head"></select></label><button id="cl">Classify</button></div>
      <div id="classify"></div>
      <div class="row"><input id="hq" placeholder="heatmap prompt, e.g. papillary architecture" size="36"><button id="hm">Heatmap</button><span id="hmsg" class="muted"></span></div>`;
    $("#zs").addEventListener("click", () => zeroShot(id));
    $("#hm").addEventListener("click", () => heatmap(id));
    if (sets.length) zeroShot(id);
    loadHeads(id, s.labels || {});
  } catch (e) {
    box.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

async function zeroShot(id) {
  const out = $("#zeroshot");
  out.innerHTML = `<p class="muted">Scoring…</p>`;
  try {
    const data = await api("POST", "/v1/zero-shot/subtype", {slide_ids: [id], prompt_set: $("#pset").value});
    const r = data.results[0];
    out.innerHTML = `<h3 id="zs-title">Zero-shot: <span id="predicted">${esc(r.predicted)}</span></h3>
      ${probsTable(r.probabilities)}
      <p class="muted">${data.ensemble.templates} templates × ${data.ensemble.names_per_class.join("/")} class names, prompt set ${esc(data.ensemble.prompt_set)}</p>`;
    setBarWidths(out);
  } catch (e) {
    out.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

// Class probabilities as rows of bars, most probable first.
function probsTable(probabilities) {
  const rows = Object.entries(probabilities).sort((a, b) => b[1] - a[1])
    .map(([k, p]) => `<tr><td>${esc(k)}</td><td class="bar-cell"><div class="bar" data-width="${(100 * p).toFixed(1)}"></div></td><td class="score">${(100 * p).toFixed(1)}%</td></tr>`).join("");
  return `<table class="probs">${rows}</table>`;
}

// Widths through the CSSOM: the Content-Security-Policy refuses inline style attributes.
function setBarWidths(el) {
  el.querySelectorAll(".bar").forEach((bar) => { bar.style.width = `${bar.dataset.width}%`; });
}

// Heads trained on labelled slides (gigapath probe train): shown next to zero-shot when any
// exist; a head predicting one of the slide's labels is preselected.
async function loadHeads(id, slideLabels) {
  const heads = (await api("GET", "/v1/probes").catch(() => ({heads: []}))).heads || [];
  if (!heads.length) return;
  const fit = heads.find((h) => h.label in slideLabels) || heads[0];
  $("#head").innerHTML = heads.map((h) => `<option value="${esc(h.name)}"${h === fit ? " selected" : ""}>${esc(h.name)} (${esc(h.kind)}, ${esc(h.label)})</option>`).join("");
  $("#head-row").hidden = false;
  $("#cl").addEventListener("click", () => classify(id));
  classify(id);
}

async function classify(id) {
  const out = $("#classify");
  out.innerHTML = `<p class="muted">Classifying…</p>`;
  try {
    const data = await api("POST", "/v1/classify", {head: $("#head").value, slide_ids: [id]});
    const r = data.results[0], h = data.head;
    const cv = h.cv_balanced_accuracy ? `, cross-validated balanced accuracy ${h.cv_balanced_accuracy.value.toFixed(3)} [${h.cv_balanced_accuracy.low.toFixed(3)}, ${h.cv_balanced_accuracy.high.toFixed(3)}]` : "";
    out.innerHTML = `<h3 id="cl-title">Head ${esc(h.name)}: <span id="head-predicted">${esc(r.predicted)}</span></h3>
      ${probsTable(r.probabilities)}
      <p class="muted">${esc(h.kind)} on ${esc(h.input)} inputs, label ${esc(h.label)}, trained ${esc(h.created_at)} on ${h.training_slides} slides of ${h.training_patients} patients${cv}; fingerprint ${esc(h.fingerprint)}</p>`;
    setBarWidths(out);
    if (h.kind === "abmil") {
      // Attention MIL: which tiles the prediction rests on, drawn like the prompt heatmap.
      const map = await api("POST", "/v1/classify/heatmap", {head: h.name, slide_id: id});
      const [lo, hi] = drawHeat(map);
      $("#hmsg").textContent = `attention of ${h.name} ${lo.toFixed(3)} (blue) … ${hi.toFixed(3)} (red), ${map.tiles.length} tiles`;
    }
  } catch (e) {
    out.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

async function heatmap(id) {
  const q = $("#hq").value.trim();
  const msg = $("#hmsg");
  if (!q) { msg.textContent = "type a prompt first"; return; }
  msg.textContent = "computing…";
  try {
    const h = await api("POST", `/v1/slides/${encodeURIComponent(id)}/heatmap`, {query: q});
    const [lo, hi] = drawHeat(h);
    msg.textContent = `similarity ${lo.toFixed(3)} (blue) … ${hi.toFixed(3)} (red), ${h.tiles.length} tiles`;
  } catch (e) {
    msg.innerHTML = `<span class="error">${esc(e.message)}</span>`;
  }
}

// Draws a per-tile map (a prompt heatmap or a head's attention) over the overlay picture, blue
// (lowest) to red (highest); returns [lowest, highest].
function drawHeat(h) {
  const img = $("#overlay"), canvas = $("#heat");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const sx = canvas.width * h.level0_tile_px / h.level0_width, sy = canvas.height * h.level0_tile_px / h.level0_height;
  const lo = Math.min(...h.tiles.map((t) => t[2])), hi = Math.max(...h.tiles.map((t) => t[2]));
  for (const [gx, gy, v] of h.tiles) {
    const a = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    ctx.fillStyle = `rgba(${Math.round(255 * a)}, ${Math.round(80 * (1 - a))}, ${Math.round(255 * (1 - a))}, 0.55)`;
    ctx.fillRect(gx * sx, gy * sy, Math.ceil(sx), Math.ceil(sy));
  }
  return [lo, hi];
}

const params = new URLSearchParams(location.search);
if (params.get("slide")) openSlide(params.get("slide"));
