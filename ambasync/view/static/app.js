// ambasync view: the page. Plain JavaScript and canvas, served by the app itself (no CDN, no build).
"use strict";
(function () {
  const SCALE = 5;                  // screen pixels per voxel
  const M = { left: 30, top: 18, bottom: 26, right: 14 };  // margins for title and mm ticks
  const AXIS_NAME = { z: "axial", y: "coronal", x: "sagittal" };
  const CMAPS = {
    viridis: [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[109,205,89],[180,222,44],[253,231,37]],
    magma: [[0,0,4],[28,16,68],[79,18,123],[129,37,129],[181,54,122],[229,80,100],[251,135,97],[254,194,135],[252,253,191]],
    coolwarm: [[59,76,192],[98,130,234],[141,176,254],[184,208,249],[221,221,221],[245,196,173],[244,154,123],[222,96,77],[180,4,38]],
    gray: [[0,0,0],[255,255,255]],
  };
  const LUT = {};
  for (const [name, pts] of Object.entries(CMAPS)) {
    const lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = i / 255 * (pts.length - 1), k = Math.min(Math.floor(t), pts.length - 2), f = t - k;
      for (let c = 0; c < 3; c++) lut[i * 3 + c] = pts[k][c] + (pts[k + 1][c] - pts[k][c]) * f;
    }
    LUT[name] = lut;
  }

  const $ = (id) => document.getElementById(id);
  const state = {
    info: null, pos: [0, 0, 0], gene: null, experiment: null,
    rows: { a: null, b: null },       // layer keys
    slices: { a: {}, b: {} },         // axis -> slice JSON
    labels: {},                        // axis -> labels slice
    coverage: {},                      // axis -> coverage slice
    generation: { a: 0, b: 0 }, job: null, mapKey: null, draws: 0,
  };
  window.ambasyncView = { state, exportPng: () => composite().toDataURL("image/png") };

  async function api(path, options) {
    const response = await fetch(path, options);
    let body = null;
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    if (!response.ok) { const err = new Error(body && body.error || response.statusText); err.status = response.status; throw err; }
    return body;
  }
  const fmt = (v, d = 3) => v === null || v === undefined ? "—" : (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : String(v));
  function esc(s) { return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
  function status(text) { $("status").textContent = text; }

  // ------------------------------------------------------------------ find
  function autocomplete(input, list, onPick) {
    let items = [], active = -1, timer = null, seq = 0;
    function render() {
      list.innerHTML = items.map((m, i) => `<li data-i="${i}" class="${i === active ? "active" : ""}">` +
        (m.kind === "gene" ? `<b>${esc(m.gene)}</b> <span class="muted">${esc(m.gene_name)} · ${m.experiments} exp.</span>`
          : `<b>${m.experiment_id}</b> <span class="muted">${esc(m.gene)} · ${esc(m.plane)}</span>`) + "</li>").join("");
      list.hidden = items.length === 0;
    }
    async function lookup() {
      const q = input.value.trim(), mine = ++seq;
      if (!q) { items = []; render(); return; }
      try {
        const r = await api(`/api/find?q=${encodeURIComponent(q)}&limit=15`);
        if (mine !== seq) return;
        items = r.matches; active = items.length ? 0 : -1; render();
      } catch (e) { status(e.message); }
    }
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(lookup, 80); });
    input.addEventListener("keydown", async (ev) => {
      if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
        active = Math.max(0, Math.min(items.length - 1, active + (ev.key === "ArrowDown" ? 1 : -1))); render(); ev.preventDefault();
      } else if (ev.key === "Enter") {
        clearTimeout(timer);
        if (!items.length || seq === 0) await lookup();
        if (items.length) { const m = items[Math.max(active, 0)]; list.hidden = true; onPick(m); }
      } else if (ev.key === "Escape") { list.hidden = true; }
    });
    list.addEventListener("mousedown", (ev) => {
      const li = ev.target.closest("li"); if (!li) return;
      ev.preventDefault(); list.hidden = true; onPick(items[+li.dataset.i]);
    });
    input.addEventListener("blur", () => setTimeout(() => { if (document.activeElement !== input) list.hidden = true; }, 150));
  }

  async function chooseGene(gene, experimentId) {
    const g = await api(`/api/gene?gene=${encodeURIComponent(gene)}`);
    state.gene = g;
    $("gene-title").textContent = g.gene;
    $("gene-name").textContent = `${g.gene_name || ""} — ${g.experiments.length} experiment(s)`;
    const first = experimentId || (g.experiments.find((e) => e.plane === "coronal") || g.experiments[0]).experiment_id;
    await chooseExperiment(first);
  }
  async function chooseExperiment(id) {
    let row = state.gene && state.gene.experiments.find((e) => e.experiment_id === id);
    if (!row) { const e = await api(`/api/experiment?id=${id}`); state.gene = { gene: e.gene, gene_name: e.gene_name, experiments: e.same_gene }; row = e;
      $("gene-title").textContent = e.gene; $("gene-name").textContent = `${e.gene_name || ""} — ${e.same_gene.length} experiment(s)`; }
    state.experiment = id;
    if (document.activeElement !== $("find")) $("find").value = state.gene.gene;
    $("experiments").innerHTML = state.gene.experiments.map((e) =>
      `<button data-id="${e.experiment_id}" class="${e.experiment_id === id ? "current" : ""}">${esc(e.plane)} ${e.experiment_id}</button>`).join("");
    $("catalogue").innerHTML = Object.entries(row).filter(([k]) => k !== "same_gene")
      .map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(fmt(v))}</td></tr>`).join("");
    history.replaceState(null, "", `/?gene=${encodeURIComponent(state.gene.gene)}&experiment=${id}`);
    await setRow("a", `experiment:${id}`);
  }
  $("experiments").addEventListener("click", (ev) => { const b = ev.target.closest("button"); if (b) chooseExperiment(+b.dataset.id).catch(showError); });

  // ------------------------------------------------------------------ slices
  function dimsOf(axis) { return { z: ["y", "x"], y: ["z", "x"], x: ["z", "y"] }[axis]; }
  const axisIndex = { z: 0, y: 1, x: 2 };

  async function fetchSlice(layer, axis) {
    return api(`/api/slice?layer=${encodeURIComponent(layer)}&axis=${axis}&index=${state.pos[axisIndex[axis]]}`);
  }
  async function setRow(row, layer) {
    state.rows[row] = layer;
    $(`row-${row}`).hidden = !layer;
    await Promise.all([refresh([row]), state.clicked ? voxelInfo() : null]);  // the panel follows the layers shown
  }
  function voxelInfo() {
    const [z, y, x] = state.pos;
    const layers = [state.rows.a, state.rows.b].filter(Boolean).join(";");
    return api(`/api/voxel?z=${z}&y=${y}&x=${x}&layers=${encodeURIComponent(layers)}`).then(showVoxel);
  }
  async function refresh(rows) {
    rows = rows || ["a", "b"];
    const jobs = [];
    for (const row of rows) {
      const layer = state.rows[row];
      if (!layer) continue;
      const gen = ++state.generation[row];
      jobs.push(Promise.all(["z", "y", "x"].map((axis) => fetchSlice(layer, axis))).then((slices) => {
        if (gen !== state.generation[row]) return;
        slices.forEach((s) => { state.slices[row][s.axis] = s; });
        drawRow(row);
      }));
    }
    if (state.info && state.info.labels && $("show-labels").checked) {
      jobs.push(Promise.all(["z", "y", "x"].map((a) => fetchSlice("labels", a))).then((s) => { s.forEach((x) => { state.labels[x.axis] = x; }); }));
    }
    if ($("show-coverage").checked) {
      jobs.push(Promise.all(["z", "y", "x"].map((a) => fetchSlice("coverage:coronal", a))).then((s) => { s.forEach((x) => { state.coverage[x.axis] = x; }); }));
    }
    try { await Promise.all(jobs); } catch (e) { showError(e); }
    for (const row of ["a", "b"]) if (state.rows[row]) drawRow(row);
  }
  function showError(e) { status(e.message || String(e)); }

  function colour(v, s, lut) {
    let t = (v - s.vmin) / (s.vmax - s.vmin); t = t < 0 ? 0 : t > 1 ? 1 : t;
    return Math.round(t * 255) * 3;
  }
  function labelColour(v) { const h = (v * 2654435761) >>> 0; return [(h >>> 16) & 255, (h >>> 8) & 255, h & 255]; }

  function drawRow(row) {
    const s0 = state.slices[row].z;
    if (!s0) return;
    $(`title-${row}`).textContent = s0.title;
    for (const axis of ["z", "y", "x"]) drawPanel(row, axis);
    drawBar($(`bar-${row}`), s0);
    state.draws++;
    document.body.dataset.draws = String(state.draws);
  }

  function drawPanel(row, axis) {
    const s = state.slices[row][axis], canvas = $(`${row}-${axis}`);
    if (!s) return;
    const [h, w] = s.shape, W = w * SCALE, H = h * SCALE;
    canvas.width = W + M.left + M.right; canvas.height = H + M.top + M.bottom;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#111"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    const img = ctx.createImageData(w, h), lut = LUT[s.cmap] || LUT.viridis;
    for (let r = 0; r < h; r++) {
      const src = s.values[h - 1 - r];             // higher index at the top
      for (let c = 0; c < w; c++) {
        const v = src[c], o = (r * w + c) * 4;
        if (v === null) { img.data[o + 3] = 0; continue; }
        let rgb;
        if (s.nodata !== null && v === s.nodata) {
          const g = ((r + c) & 1) ? 150 : 110; rgb = [g, g, g];   // no data: a grey checker, never a colour of the map
        } else if (s.cmap === "labels") {
          rgb = v === 0 ? [0, 0, 0] : labelColour(v);
        } else { const k = colour(v, s, lut); rgb = [lut[k], lut[k + 1], lut[k + 2]]; }
        img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
      }
    }
    const tmp = document.createElement("canvas"); tmp.width = w; tmp.height = h;
    tmp.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(tmp, M.left, M.top, W, H);
    const lab = state.info && state.info.labels && $("show-labels").checked ? state.labels[axis] : null;
    if (lab && lab.index === s.index) contours(ctx, lab.values, h, w, (a, b) => a !== b, "rgba(255,255,255,0.3)");
    const cov = $("show-coverage").checked ? state.coverage[axis] : null;
    if (cov && cov.index === s.index) contours(ctx, cov.values, h, w, (a, b) => (a >= 0.8) !== (b >= 0.8), "#ff5252");
    // cursor
    const [dr, dc] = dimsOf(axis), pr = state.pos[axisIndex[dr]], pc = state.pos[axisIndex[dc]];
    ctx.strokeStyle = "rgba(0,255,255,0.8)"; ctx.lineWidth = 1; ctx.beginPath();
    const cx = M.left + (pc + 0.5) * SCALE, cy = M.top + (h - 1 - pr + 0.5) * SCALE;
    ctx.moveTo(cx, M.top); ctx.lineTo(cx, M.top + H); ctx.moveTo(M.left, cy); ctx.lineTo(M.left + W, cy); ctx.stroke();
    // title and mm ticks
    ctx.fillStyle = "#eee"; ctx.font = "11px sans-serif"; ctx.textBaseline = "top";
    ctx.fillText(`${AXIS_NAME[axis]}  ${axis} = ${s.world_mm.toFixed(2)} mm`, M.left, 3);
    ticks(ctx, dc, w, (i) => M.left + (i + 0.5) * SCALE, M.top + H + 3, true);
    ticks(ctx, dr, h, (i) => M.top + (h - 1 - i + 0.5) * SCALE, 2, false);
    canvas.dataset.layer = s.layer; canvas.dataset.index = String(s.index);
  }
  function ticks(ctx, dim, n, place, at, horizontal) {
    // a tick label at every whole 2 mm of world coordinate, placed between voxel centres as needed
    const coords = state.info.coords_mm[dim], c0 = coords[0], step = n > 1 ? coords[1] - coords[0] : 1;
    const lo = Math.min(c0, coords[n - 1]), hi = Math.max(c0, coords[n - 1]);
    ctx.fillStyle = "#aaa"; ctx.font = "10px sans-serif";
    for (let mm = Math.ceil(lo / 2) * 2; mm <= hi; mm += 2) {
      const p = place((mm - c0) / step);
      if (horizontal) { ctx.textBaseline = "top"; ctx.textAlign = "center"; ctx.fillText(String(mm), p, at); }
      else { ctx.textBaseline = "middle"; ctx.textAlign = "right"; ctx.fillText(String(mm), M.left - 4, p); }
    }
    ctx.textAlign = "left";
    if (horizontal) { ctx.fillStyle = "#777"; ctx.textAlign = "right"; ctx.fillText(`${dim} (mm)`, place(n - 1) + SCALE, at + 12); ctx.textAlign = "left"; }
    else { ctx.fillStyle = "#777"; ctx.textBaseline = "top"; ctx.fillText(`${dim}`, 2, M.top); }
  }
  function contours(ctx, values, h, w, differs, colour) {
    ctx.strokeStyle = colour; ctx.lineWidth = 1; ctx.beginPath();
    for (let r = 0; r < h; r++) for (let c = 0; c < w; c++) {
      const v = values[r][c], y = M.top + (h - 1 - r) * SCALE, x = M.left + c * SCALE;
      if (c + 1 < w && differs(v, values[r][c + 1])) { ctx.moveTo(x + SCALE, y); ctx.lineTo(x + SCALE, y + SCALE); }
      if (r + 1 < h && differs(v, values[r + 1][c])) { ctx.moveTo(x, y); ctx.lineTo(x + SCALE, y); }
    }
    ctx.stroke();
  }
  function drawBar(canvas, s) {
    const ctx = canvas.getContext("2d"), lut = LUT[s.cmap] || LUT.viridis;
    ctx.fillStyle = "#111"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#eee"; ctx.font = "10px sans-serif"; ctx.textBaseline = "top";
    if (s.cmap === "labels") { ctx.fillText("labels (colour per label)", 4, 4); return; }
    const x0 = 40, width = 180;
    for (let i = 0; i < width; i++) {
      const k = Math.round(i / (width - 1) * 255) * 3;
      ctx.fillStyle = `rgb(${lut[k]},${lut[k + 1]},${lut[k + 2]})`; ctx.fillRect(x0 + i, 2, 1, 14);
    }
    ctx.fillStyle = "#eee";
    ctx.textAlign = "right"; ctx.fillText(fmt(s.vmin, 2), x0 - 4, 4);
    ctx.textAlign = "left"; ctx.fillText(fmt(s.vmax, 2), x0 + width + 4, 4);
    const what = { expression: "expression energy", correlation: "correlation r", coverage: "coverage", map: "map value" }[s.kind] || s.kind;
    ctx.fillText(what, x0, 20);
    if (s.nodata !== null) {
      for (let i = 0; i < 4; i++) for (let j = 0; j < 2; j++) { const g = ((i + j) & 1) ? 150 : 110; ctx.fillStyle = `rgb(${g},${g},${g})`; ctx.fillRect(x0 + 110 + i * 4, 19 + j * 4, 4, 4); }
      ctx.fillStyle = "#eee"; ctx.fillText("no data (−1)", x0 + 130, 20);
    }
  }

  // ------------------------------------------------------------------ clicks
  for (const canvas of document.querySelectorAll("canvas.slice")) {
    canvas.addEventListener("click", (ev) => {
      const s = state.slices[canvas.dataset.row][canvas.dataset.axis];
      if (!s) return;
      const rect = canvas.getBoundingClientRect();
      const px = (ev.clientX - rect.left) * canvas.width / rect.width - M.left, py = (ev.clientY - rect.top) * canvas.height / rect.height - M.top;
      const [h, w] = s.shape, c = Math.floor(px / SCALE), r = h - 1 - Math.floor(py / SCALE);
      if (c < 0 || c >= w || r < 0 || r >= h) return;
      const [dr, dc] = dimsOf(s.axis);
      state.pos[axisIndex[dr]] = r; state.pos[axisIndex[dc]] = c;
      moved($("seed-mode").checked).catch(showError);
    });
  }
  // the world coordinates under the mouse, without asking the server
  for (const canvas of document.querySelectorAll("canvas.slice")) {
    canvas.addEventListener("mousemove", (ev) => {
      const s = state.slices[canvas.dataset.row][canvas.dataset.axis];
      if (!s || !state.info) return;
      const rect = canvas.getBoundingClientRect();
      const px = (ev.clientX - rect.left) * canvas.width / rect.width - M.left, py = (ev.clientY - rect.top) * canvas.height / rect.height - M.top;
      const [h, w] = s.shape, c = Math.floor(px / SCALE), r = h - 1 - Math.floor(py / SCALE);
      if (c < 0 || c >= w || r < 0 || r >= h) { $("hover").textContent = ""; return; }
      const p = state.pos.slice(), [dr, dc] = dimsOf(s.axis);
      p[axisIndex[dr]] = r; p[axisIndex[dc]] = c;
      const v = s.values[r][c], cm = state.info.coords_mm;
      $("hover").textContent = `x ${cm.x[p[2]].toFixed(2)}, y ${cm.y[p[1]].toFixed(2)}, z ${cm.z[p[0]].toFixed(2)} mm: ` +
        (v === null ? "—" : s.nodata !== null && v === s.nodata ? "no data" : fmt(v, 3));
    });
    canvas.addEventListener("mouseleave", () => { $("hover").textContent = ""; });
  }
  // the wheel over a slice moves through its axis (one voxel per notch), as in other viewers
  for (const canvas of document.querySelectorAll("canvas.slice")) {
    canvas.addEventListener("wheel", (ev) => {
      const s = state.slices[canvas.dataset.row][canvas.dataset.axis];
      if (!s || !state.info) return;
      ev.preventDefault();
      const a = axisIndex[s.axis], next = state.pos[a] + (ev.deltaY < 0 ? 1 : -1);
      if (next < 0 || next >= state.info.shape[a]) return;
      state.pos[a] = next;
      clearTimeout(state.wheelTimer);
      state.wheelTimer = setTimeout(() => moved(false).catch(showError), 30);
    }, { passive: false });
  }
  async function moved(seedToo) {
    const [z, y, x] = state.pos;
    state.clicked = true;
    const tasks = [refresh(), voxelInfo()];
    if (seedToo) tasks.push(seed(z, y, x));
    await Promise.all(tasks);
  }
  function showVoxel(v) {
    const w = v.world_mm;
    let html = `<div>voxel (z ${v.index[0]}, y ${v.index[1]}, x ${v.index[2]})</div>` +
      `<div><b>x ${w.x.toFixed(2)}, y ${w.y.toFixed(2)}, z ${w.z.toFixed(2)} mm</b></div>`;
    for (const [, val] of Object.entries(v.values))
      html += `<div>${esc(val.title)}: <b>${val.nodata ? "no data (−1)" : fmt(val.value, 4)}</b></div>`;
    if (v.label) html += `<div>label: <b>${v.label.value}</b> ${esc(v.label.name)}</div>`;
    $("voxel-info").innerHTML = html; $("voxel-info").classList.remove("muted");
  }
  async function seed(z, y, x, attempt = 0) {
    $("seed-info").textContent = "computing…";
    try {
      const r = await api(`/api/seed?z=${z}&y=${y}&x=${x}&plane=${$("seed-plane").value || "coronal"}`);
      $("seed-info").textContent = `r over ${r.experiments} ${r.plane} experiments, ${r.voxels} voxels: ${r.ms} ms. Genes most expressed at the seed (value / brain mean):`;
      $("seed-genes").innerHTML = "<thead><tr><th>gene</th><th>experiment</th><th>value</th><th>÷ brain</th></tr></thead><tbody>" +
        r.top_genes.map((g) => `<tr data-id="${g.experiment_id}"><td>${esc(g.gene)}</td><td>${g.experiment_id}</td><td>${fmt(g.value)}</td><td>${fmt(g.ratio, 2)}</td></tr>`).join("") + "</tbody>";
      await setRow("b", r.layer);
    } catch (e) {
      if (e.status === 503 && attempt < 600 && /loading/.test(e.message)) { $("seed-info").textContent = e.message; await new Promise((res) => setTimeout(res, 1000)); return seed(z, y, x, attempt + 1); }
      $("seed-info").textContent = e.message;
    }
  }
  $("seed-genes").addEventListener("click", (ev) => { const tr = ev.target.closest("tr[data-id]"); if (tr) chooseExperiment(+tr.dataset.id).catch(showError); });
  $("close-b").addEventListener("click", () => { state.rows.b = null; $("row-b").hidden = true; });
  $("show-labels").addEventListener("change", () => refresh());
  $("show-coverage").addEventListener("change", () => refresh());

  // ------------------------------------------------------------------ your map
  function fillMaps(maps, select) {
    $("map-select").innerHTML = maps.length ? maps.map((m) => `<option value="${esc(m.key)}">${esc(m.name)} (${m.source})</option>`).join("")
      : `<option value="">no maps: upload one, or start with --maps DIR</option>`;
    if (select) $("map-select").value = select;
  }
  $("map-upload").addEventListener("change", async () => {
    const file = $("map-upload").files[0]; if (!file) return;
    $("search-error").hidden = true;
    if (state.info && file.size > state.info.max_upload_bytes) { searchError(`${file.name} is larger than the ${state.info.max_upload_bytes / 1048576} MB limit`); return; }
    const form = new FormData(); form.append("file", file, file.name);
    try {
      const r = await api("/api/maps", { method: "POST", body: form });
      const m = await api("/api/maps"); fillMaps(m.maps, r.key);
    } catch (e) { searchError(e.message); }
  });
  function searchError(text) { $("search-error").textContent = text; $("search-error").hidden = false; }
  $("map-show").addEventListener("click", () => { const key = $("map-select").value; if (key) setRow("b", `map:${key}`).catch((e) => searchError(e.message)); });
  $("search-run").addEventListener("click", async () => {
    const key = $("map-select").value;
    $("search-error").hidden = true; $("search-downloads").hidden = true; $("results").innerHTML = "";
    if (!key) { searchError("choose or upload a map first"); return; }
    try {
      const job = await api("/api/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ map: key, nulls: +$("nulls").value }) });
      state.job = job.job; state.mapKey = key;
      $("search-progress").hidden = false; pollSearch(job.job);
    } catch (e) { searchError(e.message); }
  });
  async function pollSearch(id) {
    let j;
    try { j = await api(`/api/search/${id}?rows=50`); } catch (e) { searchError(e.message); return; }
    const p = $("search-progress");
    p.value = j.total_tasks ? j.done_tasks / j.total_tasks : 0;
    $("search-status").textContent = `${j.map_title}: ${j.phase} ${j.total_tasks ? `(${j.done_tasks}/${j.total_tasks} tasks)` : ""} · ${j.seconds} s`;
    if (j.state === "running") { setTimeout(() => pollSearch(id), 300); return; }
    p.hidden = true;
    if (j.state === "failed") { searchError(j.error); return; }
    $("search-status").textContent = `${j.map_title}: ${j.n_rows} experiments ranked in ${j.seconds} s (${j.nulls} nulls). Click a row to see it beside the map.`;
    $("csv-link").href = `/api/search/${id}/results.csv`; $("png-link").href = `/api/search/${id}/picture.png`;
    $("search-downloads").hidden = false;
    $("results").innerHTML = "<thead><tr><th>#</th><th>gene</th><th>experiment</th><th>plane</th><th>r</th><th>p_spatial</th><th>q</th></tr></thead><tbody>" +
      j.rows.map((r, i) => `<tr data-id="${r.experiment_id}"><td>${i + 1}</td><td>${esc(r.gene)}</td><td>${r.experiment_id}</td><td>${esc(r.plane)}</td><td>${fmt(r.r)}</td><td>${fmt(r.p_spatial, 4)}</td><td>${fmt(r.q, 4)}</td></tr>`).join("") + "</tbody>";
    document.body.dataset.searchDone = id;
  }
  $("results").addEventListener("click", async (ev) => {
    const tr = ev.target.closest("tr[data-id]"); if (!tr) return;
    for (const other of $("results").querySelectorAll("tr.current")) other.classList.remove("current");
    tr.classList.add("current");
    $("seed-mode").checked = false;
    try { await chooseExperiment(+tr.dataset.id); await setRow("b", `map:${state.mapKey}`); } catch (e) { searchError(e.message); }
  });

  // ------------------------------------------------------------------ export
  function composite() {
    const rows = ["a", "b"].filter((r) => state.rows[r] && !$(`row-${r}`).hidden);
    const canvases = rows.map((r) => [$(`bar-${r}`), ...["z", "y", "x"].map((a) => $(`${r}-${a}`))]);
    const width = Math.max(400, ...canvases.map((cs) => cs.slice(1).reduce((s, c) => s + c.width + 6, 0)));
    const rowH = canvases.map((cs) => 40 + Math.max(...cs.slice(1).map((c) => c.height)));
    const out = document.createElement("canvas"); out.width = width + 12; out.height = rowH.reduce((a, b) => a + b, 0) + 12;
    const ctx = out.getContext("2d"); ctx.fillStyle = "#111"; ctx.fillRect(0, 0, out.width, out.height);
    let y = 6;
    canvases.forEach((cs, i) => {
      ctx.fillStyle = "#eee"; ctx.font = "bold 12px sans-serif"; ctx.textBaseline = "top";
      ctx.fillText($(`title-${rows[i]}`).textContent, 6, y + 4);
      ctx.drawImage(cs[0], Math.max(340, width - cs[0].width), y);
      let x = 6;
      for (const c of cs.slice(1)) { ctx.drawImage(c, x, y + 40); x += c.width + 6; }
      y += rowH[i];
    });
    return out;
  }
  $("export-png").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = composite().toDataURL("image/png");
    a.download = `ambasync-view-${state.rows.a ? state.rows.a.replace(/[^A-Za-z0-9_-]+/g, "_") : "empty"}.png`;
    document.body.appendChild(a); a.click(); a.remove();
  });

  // ------------------------------------------------------------------ start
  async function pollCoexpression() {
    try {
      const c = await api("/api/coexpression");
      if (c.state === "loading" || c.state === "waiting") { status(`co-expression: reading ${Math.round(c.progress * 100)} % of ${c.experiments} ${c.plane} experiments…`); setTimeout(pollCoexpression, 1500); }
      else if (c.state === "ready") status(`${state.info.experiments} experiments · co-expression ready (${c.experiments} ${c.plane} × ${c.voxels} voxels, ${c.memory_mb} MB ${c.dtype})`);
      else status(`co-expression unavailable: ${c.error}`);
    } catch (e) { showError(e); }
  }
  async function start() {
    state.info = await api("/api/info");
    state.pos = state.info.shape.map((n) => Math.floor(n / 2));
    fillMaps(state.info.maps);
    $("seed-plane").innerHTML = state.info.seed_planes.map((p) => `<option value="${p}">${p}</option>`).join("");
    $("seed-plane-row").hidden = state.info.seed_planes.length < 2;
    autocomplete($("find"), $("suggest"), (m) => (m.kind === "gene" ? chooseGene(m.gene) : chooseExperiment(m.experiment_id)).catch(showError));
    autocomplete($("compare"), $("suggest-compare"), async (m) => {
      try {
        $("seed-mode").checked = false;
        const id = m.kind === "gene" ? (await api(`/api/gene?gene=${encodeURIComponent(m.gene)}`)).experiments[0].experiment_id : m.experiment_id;
        await setRow("b", `experiment:${id}`);
      } catch (e) { showError(e); }
    });
    pollCoexpression();
    const q = new URLSearchParams(location.search);
    try {
      if (q.get("experiment")) await chooseExperiment(parseInt(q.get("experiment"), 10));
      else if (q.get("gene")) await chooseGene(q.get("gene"));
      if (q.get("gene") || q.get("experiment")) $("find").value = state.gene ? state.gene.gene : "";
    } catch (e) { showError(e); $("gene-name").textContent = e.message; }
    document.body.dataset.readyMs = String(Math.round(performance.now()));  // navigation start -> slices drawn
    document.body.dataset.ready = "1";
  }
  start().catch(showError);
})();
