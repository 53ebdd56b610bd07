// vitattn explorer: draws attention maps over the photo from the data embedded in this page. No network.
(function () {
  'use strict';
  const D = JSON.parse(document.getElementById('vitattn-data').textContent);
  const GH = D.grid[0], GW = D.grid[1], G = GH * GW, P = D.roles.length, N = P + G, H = D.heads.length;
  const FLAT_RTOL = 1e-6, DIM = 0.45;
  const $ = (id) => document.getElementById(id);

  function bytes(b64) {
    const bin = atob(b64), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const luts = {};
  for (const name of Object.keys(D.luts)) luts[name] = bytes(D.luts[name]);
  const cache = { prefix: {}, patch: {} };
  function stored(kind, b) {  // {q, s, levels} of one block's prefix or patch rows, decoded once
    const c = cache[kind];
    if (!(b in c)) {
      const e = D[kind][String(b)];
      if (!e) { c[b] = null; } else {
        const q = bytes(e.q);
        c[b] = { q: kind === 'prefix' ? new Uint16Array(q.buffer) : q, s: new Float32Array(bytes(e.s).buffer),
          levels: D.levels[kind], rows: kind === 'prefix' ? P : G };
      }
    }
    return c[b];
  }
  const methodMaps = {};
  for (const m of Object.keys(D.methods)) {
    methodMaps[m] = {};
    for (const b of Object.keys(D.methods[m].maps)) methodMaps[m][b] = new Float32Array(bytes(D.methods[m].maps[b]).buffer);
  }
  const patchBlocks = new Set(D.patch_blocks);

  // -- state -----------------------------------------------------------------------------------------
  const S = {
    block: D.blocks.length - 1,          // index into D.blocks
    head: D.fuse,                        // a head's position in D.heads, or 'mean' / 'max' / 'min'
    method: 'raw',
    query: D.roles.indexOf(D.query) >= 0 ? 'p' + D.roles.indexOf(D.query) : D.query === 'patch-mean' || !P ? 'patchmean' : 'p0',
    pinned: null,                        // [r, c] of a pinned patch query
    hover: null,                         // [r, c] under the cursor
    cmap: D.luts[D.cmap] ? D.cmap : Object.keys(D.luts)[0],
    alpha: D.alpha,
    shared: D.shared_scale,
  };
  if (D.query.startsWith('patch:')) {
    const [r, c] = D.query.slice(6).split(',').map(Number);
    S.query = 'patch'; S.pinned = [r, c];
  }

  // -- data access -----------------------------------------------------------------------------------
  // The query's attention over all N tokens, one head: {v: Float64Array(N), bound} or null (not stored).
  const meanCache = {};
  function tokenRow(b, k, query) {
    if (query.kind === 'patchmean') {  // the mean over every patch's row (stored patch rows only)
      const key = b + ':' + k;
      if (!(key in meanCache)) {
        const st = stored('patch', b);
        if (!st) return null;
        const v = new Float64Array(N);
        let bound = 0;
        for (let g = 0; g < G; g++) {
          const i = k * G + g, s = st.s[i] / st.levels, off = i * N;
          for (let j = 0; j < N; j++) v[j] += st.q[off + j] * s;
          bound += s / 2;
        }
        for (let j = 0; j < N; j++) v[j] /= G;
        meanCache[key] = { v, bound: bound / G };
      }
      return meanCache[key];
    }
    let st, r;
    if (query.kind === 'prefix') { st = stored('prefix', b); r = query.index; }
    else { st = stored('patch', b); r = query.r * GW + query.c; }
    if (!st) return null;
    const i = k * st.rows + r, s = st.s[i], L = st.levels, off = i * N, v = new Float64Array(N);
    for (let j = 0; j < N; j++) v[j] = st.q[off + j] * s / L;
    return { v, bound: s / (2 * L) };
  }
  function currentQuery() {
    if (S.query === 'patchmean') return { kind: 'patchmean', name: 'patch-mean' };
    if (S.query !== 'patch') return { kind: 'prefix', index: Number(S.query.slice(1)), name: D.roles[Number(S.query.slice(1))] };
    const rc = S.pinned || S.hover;
    return rc ? { kind: 'patch', r: rc[0], c: rc[1], name: 'patch:' + rc[0] + ',' + rc[1] } : null;
  }
  function headRows(b, query) {  // every head's token row, or null
    const rows = [];
    for (let k = 0; k < H; k++) { const row = tokenRow(b, k, query); if (!row) return null; rows.push(row); }
    return rows;
  }
  function fuse(rows, how) {  // rows of the heads -> one row (values over N) and its error bound
    const v = new Float64Array(N);
    let bound = 0;
    for (let j = 0; j < N; j++) {
      let acc = how === 'mean' ? 0 : rows[0].v[j];
      for (const row of rows) {
        const x = row.v[j];
        if (how === 'mean') acc += x; else if (how === 'max') { if (x > acc) acc = x; } else if (x < acc) acc = x;
      }
      v[j] = how === 'mean' ? acc / rows.length : acc;
    }
    for (const row of rows) bound = how === 'mean' ? bound + row.bound / rows.length : Math.max(bound, row.bound);
    return { v, bound };
  }
  // The map shown for (block, head, method, query): {patches: Float64Array(G), row (N or null), bound, label}
  function mapFor(b, head, method, query) {
    if (method !== 'raw' && methodMaps[method] && query && query.name === D.methods[method].query) {
      const m = methodMaps[method][String(b)];
      if (m) return { patches: Float64Array.from(m), row: null, bound: 0, method };
    }
    if (!query) return null;
    const rows = headRows(b, query);
    if (!rows) return null;
    const one = typeof head === 'number' ? rows[head] : fuse(rows, head);
    return { patches: one.v.subarray(P), row: one.v, bound: one.bound, method: 'raw', rows };
  }
  function range(values) {
    let lo = Infinity, hi = -Infinity;
    for (const x of values) { if (x < lo) lo = x; if (x > hi) hi = x; }
    return [lo, hi];
  }
  function scaleOf(map, b, query) {  // [lo, span] as scale_maps: per map, or one over the block's heads
    let [lo, hi] = range(map.patches);
    if (S.shared && map.method === 'raw') {
      lo = Infinity; hi = -Infinity;
      for (const row of map.rows) { const [a, z] = range(row.v.subarray(P)); lo = Math.min(lo, a); hi = Math.max(hi, z); }
    }
    const span = hi - lo;
    return span > FLAT_RTOL * Math.max(Math.abs(lo), Math.abs(hi)) ? [lo, span] : [lo, 0];
  }
  function cellIndices(map, scale) {  // (G) LUT rows, as colors._heat_to_index
    const out = new Uint8Array(G), [lo, span] = scale;
    for (let g = 0; g < G; g++) {
      let s = span > 0 ? (map.patches[g] - lo) / span : 0;
      s = s < 0 ? 0 : s > 1 ? 1 : s;
      out[g] = Math.floor(s * 255 + 0.5);
    }
    return out;
  }

  // -- the photo and its crop box --------------------------------------------------------------------
  const view = $('view'), marks = $('marks'), ctx = view.getContext('2d', { willReadFrequently: true });
  const mctx = marks.getContext('2d');
  const W = D.photo_size[0], HT = D.photo_size[1];
  view.width = marks.width = W; view.height = marks.height = HT;
  const [bl, bt, br, bb] = D.crop_box;
  const span = (lo, hi, n) => [Math.max(0, Math.ceil(lo - 0.5)), Math.min(n, Math.ceil(hi - 0.5))];
  const [x0, x1] = span(bl, br, W), [y0, y1] = span(bt, bb, HT);
  const kx = GW / (br - bl), ky = GH / (bb - bt);  // cells per photo pixel
  function taps(p0, p1, origin, k, n) {  // per output pixel: two cells and a weight (bilinear, edges held)
    const a = new Int32Array(p1 - p0), z = new Int32Array(p1 - p0), f = new Float64Array(p1 - p0);
    for (let p = p0; p < p1; p++) {
      let u = (p + 0.5 - origin) * k - 0.5;
      u = Math.min(Math.max(u, 0), n - 1);
      const j = Math.floor(u);
      a[p - p0] = j; z[p - p0] = Math.min(j + 1, n - 1); f[p - p0] = u - j;
    }
    return { a, z, f };
  }
  const tx = taps(x0, x1, bl, kx, GW), ty = taps(y0, y1, bt, ky, GH);
  let photo = null, dimmed = null;
  const img = new Image();
  img.onload = () => {
    ctx.drawImage(img, 0, 0);
    photo = ctx.getImageData(0, 0, W, HT).data.slice();
    dimmed = new Uint8ClampedArray(photo.length);
    for (let i = 0; i < photo.length; i++) dimmed[i] = (i & 3) === 3 ? 255 : Math.round(photo[i] * (1 - DIM));
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) {
      const i = (y * W + x) * 4;
      dimmed[i] = photo[i]; dimmed[i + 1] = photo[i + 1]; dimmed[i + 2] = photo[i + 2];
    }
    draw();
    document.body.dataset.firstPaintMs = performance.now().toFixed(1);  // since navigation started
    document.body.dataset.ready = '1';
  };
  img.src = D.photo;

  function drawMain(map) {
    const out = new ImageData(W, HT), o = out.data;
    o.set(dimmed);
    if (map && x1 > x0 && y1 > y0) {
      const idx = cellIndices(map, scaleOf(map)), lut = luts[S.cmap], m = Math.round(S.alpha * 255);
      for (let y = y0; y < y1; y++) {
        const r0 = ty.a[y - y0] * GW, r1 = ty.z[y - y0] * GW, fy = ty.f[y - y0];
        for (let x = x0; x < x1; x++) {
          const c0 = tx.a[x - x0], c1 = tx.z[x - x0], fx = tx.f[x - x0];
          const top = idx[r0 + c0] + (idx[r0 + c1] - idx[r0 + c0]) * fx;
          const bot = idx[r1 + c0] + (idx[r1 + c1] - idx[r1 + c0]) * fx;
          const k = Math.round(top + (bot - top) * fy) * 3, i = (y * W + x) * 4;
          for (let ch = 0; ch < 3; ch++) {  // Pillow's paste through a constant mask
            const t = photo[i + ch] * (255 - m) + lut[k + ch] * m + 128;
            o[i + ch] = (t + (t >> 8)) >> 8;
          }
        }
      }
    }
    ctx.putImageData(out, 0, 0);
  }
  function drawMarks(query) {
    mctx.clearRect(0, 0, W, HT);
    const box = (r, c, color) => {
      mctx.strokeStyle = color; mctx.lineWidth = 2;
      mctx.strokeRect(bl + c / kx, bt + r / ky, 1 / kx, 1 / ky);
    };
    if (query && query.kind === 'patch') box(query.r, query.c, S.pinned ? '#00e5ff' : '#ffffff');
    if (S.hover && !(query && query.kind === 'patch' && query.r === S.hover[0] && query.c === S.hover[1])) {
      box(S.hover[0], S.hover[1], 'rgba(255,255,255,0.6)');
    }
  }

  // -- readout, notice, statistics, predictions, small multiples ------------------------------------------
  const fmt = (x) => (x === 0 ? '0' : Math.abs(x) >= 1e-3 ? x.toFixed(6) : x.toExponential(4));
  function readout(map, query) {
    const el = $('readout');
    if (!S.hover) { el.textContent = 'hover the picture'; delete el.dataset.row; return; }
    const [r, c] = S.hover;
    el.dataset.row = r; el.dataset.col = c;
    if (!map) { el.textContent = `row ${r}, col ${c} · no data`; el.dataset.value = ''; return; }
    const v = map.patches[r * GW + c];
    el.dataset.value = String(v); el.dataset.bound = String(map.bound);
    const q = query ? query.name : '-';
    el.textContent = `row ${r}, col ${c} · value ${fmt(v)} ± ${fmt(map.bound)} · query ${q} · block ${D.blocks[S.block]}`;
  }
  function stats(b, query) {
    const t = $('stats');
    const rows = query ? headRows(b, query) : null;
    if (!rows) { t.innerHTML = '<caption>no rows for this query in this block</caption>'; return; }
    let html = `<caption>block ${b}, query ${query.name}</caption><tr><th>head</th><th>entropy</th><th>prefix mass</th><th>peak</th><th>max</th></tr>`;
    rows.forEach((row, k) => {
      const p = row.v.subarray(P);
      let total = 0, best = 0, prefix = 0;
      for (let g = 0; g < G; g++) { total += p[g]; if (p[g] > p[best]) best = g; }
      for (let j = 0; j < P; j++) prefix += row.v[j];
      let ent = 0;
      for (let g = 0; g < G; g++) { const x = total > 0 ? p[g] / total : 0; if (x > 0) ent -= x * Math.log(x); }
      ent = G > 1 ? ent / Math.log(G) : 0;
      const cls = S.head === k ? ' class="current"' : '';
      html += `<tr${cls}><td>${D.heads[k]}</td><td>${ent.toFixed(3)}</td><td>${prefix.toFixed(3)}</td>` +
        `<td>${Math.floor(best / GW)},${best % GW}</td><td>${fmt(p[best])}</td></tr>`;
    });
    t.innerHTML = html;
  }
  const esc = (s) => String(s).replace(/[&<>"]/g, (ch) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[ch]);
  function predictions() {
    const el = $('top');
    if (!D.top.length) { el.textContent = ''; return; }
    const random = D.weights === 'random' ? ' (random weights: meaningless)' : '';
    el.innerHTML = `<b>top ${D.top.length}</b>${random}<ol>` +
      D.top.map((t) => `<li>${esc(t.label)} <span class="hint">${(t.prob * 100).toFixed(1)}%</span></li>`).join('') + '</ol>';
  }
  const cells = [];  // [block position, head, canvas]
  function buildMultiples() {
    const box = $('multiples'), cols = [...D.heads.map((h, k) => k), D.fuse];
    box.style.gridTemplateColumns = `max-content repeat(${cols.length}, 56px)`;
    box.appendChild(document.createElement('div'));
    for (const c of cols) {
      const h = document.createElement('div');
      h.className = 'colhead'; h.textContent = typeof c === 'number' ? 'head ' + D.heads[c] : c;
      box.appendChild(h);
    }
    D.blocks.forEach((b, pos) => {
      const label = document.createElement('div');
      label.className = 'rowhead'; label.textContent = 'block ' + b + (patchBlocks.has(b) ? ' ▪' : '');
      box.appendChild(label);
      for (const c of cols) {
        const cv = document.createElement('canvas');
        cv.width = GW; cv.height = GH; cv.title = `block ${b}, ${typeof c === 'number' ? 'head ' + D.heads[c] : c}`;
        cv.addEventListener('click', () => { S.block = pos; S.head = c; if (S.method !== 'raw') S.method = 'raw'; sync(); draw(); });
        box.appendChild(cv);
        cells.push([pos, c, cv]);
      }
    });
  }
  function drawMultiples(query) {
    for (const [pos, head, cv] of cells) {
      const b = D.blocks[pos], map = mapFor(b, head, 'raw', query), c2 = cv.getContext('2d');
      cv.classList.toggle('current', pos === S.block && head === S.head && S.method === 'raw');
      const im = c2.createImageData(GW, GH);
      if (map) {
        const idx = cellIndices(map, scaleOf(map)), lut = luts[S.cmap];
        for (let g = 0; g < G; g++) {
          im.data[g * 4] = lut[idx[g] * 3]; im.data[g * 4 + 1] = lut[idx[g] * 3 + 1];
          im.data[g * 4 + 2] = lut[idx[g] * 3 + 2]; im.data[g * 4 + 3] = 255;
        }
      }
      c2.putImageData(im, 0, 0);
    }
  }

  // -- drawing ---------------------------------------------------------------------------------------
  let pending = false;
  const timings = (window.vitattnDrawMs = []);  // how long each redraw took (read by make bench)
  function draw() {
    if (!photo) return;
    const t0 = performance.now();
    const b = D.blocks[S.block], query = currentQuery(), map = mapFor(b, S.head, S.method, query);
    drawMain(map);
    drawMarks(query);
    readout(map, query);
    let note = '';
    if (query && query.kind !== 'prefix' && !patchBlocks.has(b)) {
      note = `block ${b} has no patch queries in this page (they are stored for blocks ${D.patch_blocks.join(', ') || 'none'})`;
    } else if (S.method !== 'raw' && map && map.method === 'raw') {
      note = `${S.method} was computed for query ${D.methods[S.method].query}: showing raw attention`;
    } else if (!query) note = 'hover a patch to see where it looks';
    $('notice').textContent = note;
    stats(b, query);
    drawMultiples(query);
    $('block-label').textContent = `${b} (${S.block + 1} of ${D.blocks.length})`;
    if (timings.length < 10000) timings.push(performance.now() - t0);
  }
  function redraw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  }

  // -- controls --------------------------------------------------------------------------------------
  function option(sel, value, text) {
    const o = document.createElement('option'); o.value = value; o.textContent = text; sel.appendChild(o);
  }
  D.heads.forEach((h, k) => option($('head'), String(k), 'head ' + h));
  for (const f of ['mean', 'max', 'min']) option($('head'), f, f + ' of heads');
  option($('method'), 'raw', 'raw');
  for (const m of Object.keys(D.methods)) option($('method'), m, m + ' (query ' + D.methods[m].query + ')');
  D.roles.forEach((role, i) => option($('query'), 'p' + i, role));
  option($('query'), 'patchmean', 'patch-mean (all patches)');
  option($('query'), 'patch', 'patch (hover, click to pin)');
  for (const name of Object.keys(D.luts)) option($('cmap'), name, name);
  $('block').max = String(D.blocks.length - 1);
  function sync() {
    $('block').value = String(S.block);
    $('head').value = String(S.head);
    $('method').value = S.method;
    $('query').value = S.query;
    $('cmap').value = S.cmap;
    $('alpha').value = String(S.alpha);
    $('alpha-label').textContent = S.alpha.toFixed(2);
    $('shared').checked = S.shared;
  }
  sync();
  $('block').addEventListener('input', (e) => { S.block = Number(e.target.value); redraw(); });
  $('head').addEventListener('change', (e) => { const v = e.target.value; S.head = /^\d+$/.test(v) ? Number(v) : v; redraw(); });
  $('method').addEventListener('change', (e) => { S.method = e.target.value; redraw(); });
  $('query').addEventListener('change', (e) => { S.query = e.target.value; S.pinned = null; redraw(); });
  $('cmap').addEventListener('change', (e) => { S.cmap = e.target.value; redraw(); });
  $('alpha').addEventListener('input', (e) => { S.alpha = Number(e.target.value); sync(); redraw(); });
  $('shared').addEventListener('change', (e) => { S.shared = e.target.checked; redraw(); });
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
    if (e.target instanceof HTMLSelectElement) return;
    e.preventDefault();
    S.block = Math.min(D.blocks.length - 1, Math.max(0, S.block + (e.key === 'ArrowRight' ? 1 : -1)));
    sync(); redraw();
  });
  function patchAt(e) {
    const rect = view.getBoundingClientRect();
    const px = (e.clientX - rect.left) * (W / rect.width), py = (e.clientY - rect.top) * (HT / rect.height);
    const c = Math.floor((px - bl) * kx), r = Math.floor((py - bt) * ky);
    return r >= 0 && r < GH && c >= 0 && c < GW ? [r, c] : null;
  }
  view.addEventListener('mousemove', (e) => {
    const rc = patchAt(e);
    if (String(rc) === String(S.hover)) return;
    S.hover = rc; redraw();
  });
  view.addEventListener('mouseleave', () => { S.hover = null; redraw(); });
  view.addEventListener('click', (e) => {
    const rc = patchAt(e);
    if (!rc) return;
    if (S.query !== 'patch') { S.query = 'patch'; S.pinned = rc; }
    else S.pinned = S.pinned && String(S.pinned) === String(rc) ? null : rc;
    sync(); redraw();
  });

  // -- what the page holds -----------------------------------------------------------------------------
  const random = D.weights === 'random' ? ' · RANDOM WEIGHTS' : '';
  $('facts').textContent = `${D.input} · ${D.model}${random} · ${GH}×${GW} patches · prefix tokens: ${D.roles.join(', ') || 'none'}` +
    (D.target ? ` · explained class: ${D.target.label}` : '');
  const mb = (D.budget / 1e6).toFixed(0);
  $('about').textContent =
    `Blocks with patch queries (any patch as the query): ${D.patch_blocks.length ? D.patch_blocks.join(', ') : 'none'}` +
    ` (marked ▪; the ${mb} MB page budget holds these, the last block first); every block holds the rows of its prefix tokens. ` +
    `Values are quantised per row against the row's maximum: prefix-token rows to 16 bits (error at most max/131070), ` +
    `patch rows to 8 bits (error at most max/510); the readout shows the bound of each value.`;
  predictions();
  buildMultiples();
})();
