// moleflow review page: send images to POST /predict?maps=true, show each verdict with its heat-map
// overlay, and the service's recent verdicts (GET /verdicts). Plain DOM, no framework.
"use strict";

const $ = (selector) => document.querySelector(selector);
const decisionClass = (d) => (d === "normal" ? "normal" : d === "anomalous" ? "anomalous" : "unknown");
const fmt = (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(3));

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function card(v) {
  const div = document.createElement("div");
  div.className = "card verdict";
  div.dataset.decision = v.decision;
  const img = document.createElement("img");
  img.alt = `anomaly map of ${v.file}`;
  img.className = "overlay";
  if (v.overlay_png) img.src = `data:image/png;base64,${v.overlay_png}`;
  div.appendChild(img);
  const dl = document.createElement("dl");
  const rows = [["file", v.file], ["product", v.product], ["nearest", v.nearest_product],
                ["score", fmt(v.score)], ["threshold", `${fmt(v.threshold)} (${v.threshold_source})`]];
  for (const [key, value] of rows) {
    const dt = document.createElement("dt"); dt.textContent = key;
    const dd = document.createElement("dd"); dd.textContent = value; dd.className = key;
    dl.append(dt, dd);
  }
  const dt = document.createElement("dt"); dt.textContent = "decision";
  const dd = document.createElement("dd");
  const badge = document.createElement("span");
  badge.className = `decision ${decisionClass(v.decision)}`;
  badge.textContent = v.decision;
  dd.appendChild(badge);
  dl.append(dt, dd);
  div.appendChild(dl);
  return div;
}

async function refreshRecent() {
  const response = await fetch("/verdicts?limit=50");
  if (!response.ok) return;
  const body = await response.json();
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
    $("#products").textContent = `products: ${health.products.join(", ") || "none yet"}`;
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
    const response = await fetch("/predict?maps=true", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      showError(`${response.status}: ${body.error}`);
      $("#status").textContent = "";
      return;
    }
    const results = $("#results");
    results.replaceChildren(...body.results.map(card));
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
refreshState();
refreshRecent();
