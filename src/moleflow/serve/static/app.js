// moleflow review page: send images to POST /predict?maps=true and show each verdict with its heat-map
// overlay; review the queue of flagged, unknown and audit-sampled parts (POST /reviews); realised rates per
// product (GET /products/{name}/quality), drift (GET /drift) and unknown parts (GET /unknowns).
// Plain DOM, no framework. With a token (the service's --token) every API call sends
// "Authorization: Bearer <token>"; the token is kept in this tab's sessionStorage only.
"use strict";

const $ = (selector) => document.querySelector(selector);
const decisionClass = (d) => (d === "normal" ? "normal" : d === "anomalous" ? "anomalous" : "unknown");
const fmt = (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(3));
const pct = (x) => (x === null || x === undefined ? "n/a" : `${(100 * x).toFixed(1)}%`);
const TOKEN_KEY = "moleflow-token";
let products = [];

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.includes("-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// ------------------------------------------------------------------------------------ API with the token
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    showError("401: this service needs a token: enter it at the top and press 'use'");
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) {
    if (response.status !== 401) showError(`${response.status}: ${body.error}`);
    return null;
  }
  return body;
}

async function loadPicture(img, url) {
  // <img src> cannot send the Authorization header: fetch the PNG and show it as a blob URL
  if (!url) return;
  const response = await api(url);
  if (!response.ok) { img.alt = `no picture (${response.status})`; return; }
  img.src = URL.createObjectURL(await response.blob());
}

$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("#token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
  $("#token").value = "";
  showTokenState();
  showError("");
  refreshAll();
});

function showTokenState() { $("#token-state").textContent = token() ? "token set" : ""; }

// ------------------------------------------------------------------------------------ tabs
function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== `tab-${name}`;
  showError("");
  if (name === "queue") refreshQueue();
  if (name === "quality") refreshQuality();
  if (name === "drift") refreshDrift();
  if (name === "unknowns") refreshUnknowns();
}
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => showTab(button.dataset.tab));
}

// ------------------------------------------------------------------------------------ inspect
function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function facts(rows) {
  const dl = document.createElement("dl");
  for (const [key, value] of rows) {
    dl.append(el("dt", { text: key }), el("dd", { text: value, class: key }));
  }
  return dl;
}

function badge(decision) {
  return el("span", { class: `decision ${decisionClass(decision)}`, text: decision });
}

function card(v) {
  const div = el("div", { class: "card verdict", "data-decision": v.decision });
  const img = el("img", { alt: `anomaly map of ${v.file}`, class: "overlay" });
  if (v.overlay_png) img.src = `data:image/png;base64,${v.overlay_png}`;
  div.appendChild(img);
  const dl = facts([["file", v.file], ["product", v.product], ["nearest", v.nearest_product],
                    ["score", fmt(v.score)], ["threshold", `${fmt(v.threshold)} (${v.threshold_source})`]]);
  dl.append(el("dt", { text: "decision" }), el("dd", {}, badge(v.decision)));
  div.appendChild(dl);
  return div;
}

async function refreshRecent() {
  const body = await apiJson("/verdicts?limit=50");
  if (!body) return;
  const tbody = $("#recent tbody");
  tbody.replaceChildren();
  for (const v of body.verdicts) {
    const tr = document.createElement("tr");
    cell(tr, new Date(v.at * 1000).toLocaleTimeString());
    cell(tr, v.file);
    cell(tr, v.product);
    cell(tr, fmt(v.score));
    cell(tr, fmt(v.threshold));
    cell(tr, v.decision, `decision ${decisionClass(v.decision)}`);
    tbody.appendChild(tr);
  }
}

async function refreshState() {
  try {
    const health = await (await fetch("/health")).json();
    $("#model-state").textContent = health.model
      ? `model ${health.model} · ${health.engine}` : `model ${health.status}`;
    products = health.products || [];
    $("#products").textContent = `products: ${products.join(", ") || "none yet"}`;
    const drift = health.drift;
    $("#drift-state").textContent = drift && drift.alert && drift.alert.length ? `DRIFT: ${drift.alert.join(", ")}` : "";
    $("#drift-state").className = drift && drift.alert && drift.alert.length ? "alert" : "muted";
    const select = $("#q-product");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "", text: "all" }),
      ...products.map((p) => el("option", { value: p, text: p })),
      el("option", { value: "unknown product", text: "unknown product" }));
    select.value = chosen;
  } catch (e) {
    $("#model-state").textContent = "service unreachable";
  }
}

async function send(files) {
  const images = Array.from(files);
  if (!images.length) return;
  const form = new FormData();
  for (const f of images) form.append("files", f, f.name);
  showError("");
  $("#status").textContent = `inspecting ${images.length} image(s)…`;
  try {
    const response = await api("/predict?maps=true", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      showError(`${response.status}: ${body.error}`);
      $("#status").textContent = "";
      return;
    }
    $("#results").replaceChildren(...body.results.map(card));
    $("#status").textContent = `${body.results.length} verdict(s) in ${body.elapsed_ms.toFixed(0)} ms (model ${body.model})`;
  } catch (e) {
    showError(`request failed: ${e}`);
    $("#status").textContent = "";
  }
  await refreshRecent();
}

const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  send(e.dataTransfer.files);
});
$("#file-input").addEventListener("change", (e) => { send(e.target.files); e.target.value = ""; });
$("#refresh").addEventListener("click", refreshRecent);

// ------------------------------------------------------------------------------------ review queue
function isoOf(input) {
  // a datetime-local value is the inspector's local time: sent as UTC
  return input.value ? new Date(input.value).toISOString() : "";
}

async function review(item, div, label, correctProduct) {
  const note = div.querySelector("input.note").value.trim();
  const payload = { verdict_id: item.verdict_id, label };
  if (correctProduct) payload.correct_product = correctProduct;
  if (note) payload.note = note;
  const body = await apiJson("/reviews", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
  if (!body) return;
  const r = body.review;
  div.classList.add("reviewed");
  div.dataset.label = r.label;
  div.querySelector(".review-state").textContent =
    `${r.label}${r.correct_product ? ` (${r.correct_product})` : ""} by ${r.reviewer}`;
  for (const button of div.querySelectorAll("button")) button.disabled = true;
}

function queueCard(item) {
  const div = el("div", { class: "card qcard", "data-verdict": String(item.verdict_id), "data-decision": item.decision });
  const img = el("img", { class: "overlay", alt: `part ${item.verdict_id}` });
  div.append(img);
  loadPicture(img, item.image && item.image.url);
  const source = item.image && item.image.source ? (item.image.source === "thumbnail" ? "kept thumbnail"
    : "redrawn from its file") : "no picture";
  const dl = facts([["part", `#${item.verdict_id} · ${item.why}`], ["when", new Date(item.at).toLocaleString()],
                    ["file", item.path], ["product", item.product], ["nearest", item.nearest_product || ""],
                    ["score", `${fmt(item.score)} / ${fmt(item.threshold)}`], ["picture", source]]);
  dl.append(el("dt", { text: "decision" }), el("dd", {}, badge(item.decision)));
  div.append(dl);
  const good = item.decision === "normal" ? "good_confirmed" : "false_alarm";
  const choose = el("select", { class: "correct", "aria-label": "the right product" },
    el("option", { value: "", text: "right product…" }),
    ...products.map((p) => el("option", { value: p, text: p })), el("option", { value: "new", text: "a new product" }));
  const buttons = el("div", { class: "actions" },
    el("button", { type: "button", class: "defect", text: "defect", onclick: () => review(item, div, "defect_confirmed") }),
    el("button", { type: "button", class: "good", text: item.decision === "normal" ? "good" : "false alarm",
                   onclick: () => review(item, div, good) }),
    el("button", { type: "button", class: "wrong", text: "wrong product",
                   onclick: () => review(item, div, "wrong_product", choose.value || null) }),
    choose);
  div.append(buttons, el("input", { class: "note", type: "text", placeholder: "note (optional)" }),
             el("p", { class: "review-state muted" }));
  if (item.review) {
    div.classList.add("reviewed");
    div.querySelector(".review-state").textContent = `${item.review.label} by ${item.review.reviewer}`;
  }
  return div;
}

async function refreshQueue() {
  const params = new URLSearchParams();
  if ($("#q-product").value) params.set("product", $("#q-product").value);
  if ($("#q-decision").value) params.set("decision", $("#q-decision").value);
  if (isoOf($("#q-since"))) params.set("since", isoOf($("#q-since")));
  if (isoOf($("#q-until"))) params.set("until", isoOf($("#q-until")));
  if ($("#q-reviewed").checked) params.set("include_reviewed", "true");
  const body = await apiJson(`/reviews/queue?${params}`);
  if (!body) return;
  if (body.products && body.products.length) products = body.products;
  $("#queue").replaceChildren(...body.items.map(queueCard));
  $("#queue-status").textContent = `${body.items.length} part(s) to review (passed parts sampled at ` +
    `${pct(body.audit_rate)}${body.thumbnails ? "; thumbnails kept" : ""})`;
}
$("#queue-filters").addEventListener("submit", (e) => { e.preventDefault(); refreshQueue(); });

// ------------------------------------------------------------------------------------ plots (inline SVG)
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function linePlot(series, { width = 480, height = 160, ymax = 1, hline = null, labels = [] } = {}) {
  // series: [{values: [number|null], colour, name}], all of one length; y from 0 to ymax
  const pad = 28;
  const plot = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "plot", role: "img" });
  const n = Math.max(1, ...series.map((s) => s.values.length));
  const x = (i) => pad + (n === 1 ? (width - 2 * pad) / 2 : (i * (width - 2 * pad)) / (n - 1));
  const y = (v) => height - pad - (Math.min(v, ymax) / ymax) * (height - 2 * pad);
  plot.append(svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#9aa3b2" }));
  plot.append(svg("line", { x1: pad, y1: pad, x2: pad, y2: height - pad, stroke: "#9aa3b2" }));
  const top = svg("text", { x: 2, y: pad + 4, "font-size": 10 }); top.textContent = labels[0] || String(ymax);
  const bottom = svg("text", { x: 2, y: height - pad, "font-size": 10 }); bottom.textContent = "0";
  plot.append(top, bottom);
  if (labels[1]) {
    const first = svg("text", { x: pad, y: height - 8, "font-size": 10 }); first.textContent = labels[1];
    const last = svg("text", { x: width - pad, y: height - 8, "font-size": 10, "text-anchor": "end" });
    last.textContent = labels[2] || "";
    plot.append(first, last);
  }
  if (hline !== null) {
    plot.append(svg("line", { x1: pad, x2: width - pad, y1: y(hline), y2: y(hline), stroke: "#b91c1c",
                              "stroke-dasharray": "4 3", class: "limit" }));
  }
  for (const s of series) {
    const points = s.values.map((v, i) => (v === null || v === undefined ? null : `${x(i)},${y(v)}`));
    const drawn = points.filter((p) => p !== null);
    if (drawn.length > 1) {
      plot.append(svg("polyline", { points: drawn.join(" "), fill: "none", stroke: s.colour, "stroke-width": 2,
                                    class: `series ${s.name}` }));
    }
    for (const p of drawn) {
      const [cx, cy] = p.split(",");
      plot.append(svg("circle", { cx, cy, r: 2.5, fill: s.colour, class: `point ${s.name}` }));
    }
  }
  return plot;
}

// ------------------------------------------------------------------------------------ quality
async function refreshQuality() {
  const out = $("#quality");
  out.replaceChildren();
  for (const name of products) {
    const body = await apiJson(`/products/${encodeURIComponent(name)}/quality`);
    if (!body) continue;
    const t = body.total || {};
    const days = body.days || [];
    const div = el("div", { class: "card wide quality", "data-product": name },
      el("h3", { text: name }),
      el("p", { class: "totals", text: `false-alarm rate ${pct(t.false_alarm_rate)}${t.assumed ? "*" : ""} · ` +
        `detection rate ${pct(t.detection_rate)} · wrong product ${pct(t.wrong_product_rate)} · ` +
        `${t.flagged || 0} flagged, ${t.passed || 0} passed, ${t.ambiguous || 0} ambiguous, ` +
        `${Object.values(t.reviewed || {}).reduce((a, b) => a + b, 0)} reviewed` }));
    if (days.length) {
      div.append(linePlot([
        { name: "false-alarm", colour: "#b91c1c", values: days.map((d) => d.false_alarm_rate) },
        { name: "detection", colour: "#15803d", values: days.map((d) => d.detection_rate) }],
        { labels: ["100%", days[0].day, days[days.length - 1].day] }));
    }
    if (t.assumed) div.append(el("p", { class: "muted", text: `* ${t.assumed}` }));
    out.append(div);
  }
  if (!out.children.length) out.append(el("p", { class: "muted", text: "no products yet" }));
}

// ------------------------------------------------------------------------------------ drift
async function refreshDrift() {
  const body = await apiJson("/drift");
  if (!body) return;
  const out = $("#drift");
  out.replaceChildren();
  for (const d of body.products) {
    const state = d.alert ? `ALERT: ${d.direction === "more flags" ? "more flags" : `scores ${d.direction}`}` : "ok";
    const div = el("div", { class: `card wide drift ${d.alert ? "in-alert" : ""}`, "data-product": d.product },
      el("h3", {}, `${d.product} `, el("span", { class: d.alert ? "decision anomalous" : "decision normal", text: state })),
      el("p", { class: "muted", text: `${d.test} · ${d.parts} parts · statistic ${fmt(d.statistic)} of ` +
        `${fmt(d.threshold)}${d.since ? ` · since ${new Date(d.since).toLocaleString()}` : ""}` }));
    if (d.message) div.append(el("p", { class: "message", text: d.message }));
    if (d.path && d.path.length) {
      const ymax = Math.max(d.threshold, ...d.path) * 1.1 || 1;
      div.append(linePlot([{ name: "cusum", colour: "#2563eb", values: d.path }],
                          { ymax, hline: d.threshold, labels: [fmt(ymax), "oldest", "newest"] }));
    }
    out.append(div);
  }
  const alerts = body.alert || [];
  $("#drift-state").textContent = alerts.length ? `DRIFT: ${alerts.join(", ")}` : "";
  $("#drift-state").className = alerts.length ? "alert" : "muted";
}
$("#drift-refresh").addEventListener("click", () => refreshDrift());

// ------------------------------------------------------------------------------------ unknown parts
async function refreshUnknowns() {
  const body = await apiJson("/unknowns");
  if (!body) return;
  const out = $("#unknowns");
  out.replaceChildren(el("p", { class: "pile", text: `${body.parts} unknown-product part(s) not exported yet ` +
    `(${body.with_files} with their image file)${body.first ? `, ${new Date(body.first).toLocaleString()} to ` +
    `${new Date(body.last).toLocaleString()}` : ""}` }));
  if (body.clusters) {
    out.append(el("p", { text: `They look like ${body.clusters.k} product(s):` }));
    const byId = new Map(body.items.map((i) => [i.verdict_id, i]));
    for (const c of body.clusters.clusters) {
      const strip = el("div", { class: "strip" });
      for (const id of c.verdict_ids.slice(0, 6)) {
        const img = el("img", { class: "thumb", alt: `part ${id}` });
        strip.append(img);
        const item = byId.get(id);
        loadPicture(img, item && item.image ? item.image.url : `/verdicts/${id}/image`);
      }
      out.append(el("div", { class: "card wide cluster" }, el("h3", { text: `${c.name}: ${c.n} parts` }), strip));
    }
  } else if (body.why_not_clustered) {
    out.append(el("p", { class: "muted", text: `not clustered: ${body.why_not_clustered}` }));
  }
  if (body.parts) {
    out.append(el("p", { text: "Export the pile, then learn its products:" }),
               el("pre", { class: "command", text: `${body.commands.export}\n${body.commands.learn}` }));
  }
}

function refreshAll() {
  refreshState();
  refreshRecent();
}

showTokenState();
refreshAll();
