// The search page: lists the runs with an index, sends a text, image or key query, shows cards.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let runs = [];

async function getJson(url, options) {
  const response = await fetch(url, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

function showRun() {
  const run = runs.find((r) => r.run_id === $("run").value);
  if (!run) return;
  $("run-info").textContent =
    `${run.vectors ?? "?"} images · index ${run.index_key} · recall@10 ${run.recall_at_10} · ${run.output_root}`;
  $("report-link").href = `report?run=${encodeURIComponent(run.run_id)}`;
  $("report-link").textContent = "Report of this run";
}

async function loadRuns() {
  runs = await getJson("api/runs");
  $("run").replaceChildren(...runs.map((r) => new Option(r.run_id, r.run_id)));
  if (params.get("run")) $("run").value = params.get("run");
  if (!runs.length) $("status").textContent = "No finished laion_pipeline run has an index yet.";
  showRun();
}

function card(hit) {
  const article = document.createElement("article");
  article.className = "card";
  article.dataset.key = hit.key;
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.caption;
  img.loading = "lazy";
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = hit.caption;
  const link = document.createElement("a");
  link.className = "url";
  link.href = hit.url;
  link.rel = "noopener noreferrer";
  link.textContent = hit.url.replace(/^https?:\/\//, "");
  const similar = document.createElement("button");
  similar.type = "button";
  similar.className = "similar";
  similar.textContent = `More like ${hit.key}`;
  similar.addEventListener("click", () => {
    $("text").value = "";
    $("image").value = "";
    $("key").value = hit.key;
    search();
  });
  article.append(img, score, caption, link, similar);
  return article;
}

async function search() {
  const run = $("run").value, k = $("k").value, text = $("text").value.trim(), key = $("key").value.trim();
  const file = $("image").files[0];
  let response;
  $("status").textContent = "Searching…";
  try {
    if (file) {
      const form = new FormData();
      form.append("run", run);
      form.append("k", k);
      form.append("image", file);
      response = await getJson("api/search", { method: "POST", body: form });
    } else if (key || text) {
      const query = new URLSearchParams({ run, k, ...(key ? { key } : { text }) });
      response = await getJson(`api/search?${query}`);
    } else {
      $("status").textContent = "Type a text, pick an image or give a sample key.";
      return;
    }
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "error";
    return;
  }
  $("status").className = "";
  const what = response.query.kind === "text" ? `"${response.query.text}"` : response.query.kind === "key" ? `sample ${response.query.key}` : "the image";
  $("status").textContent = `${response.results.length} results for ${what} in ${response.took_ms} ms`;
  $("results").replaceChildren(...response.results.map(card));
}

// One query at a time: typing a text clears the key and the image, and so on.
$("text").addEventListener("input", () => { $("key").value = ""; $("image").value = ""; });
$("key").addEventListener("input", () => { $("text").value = ""; $("image").value = ""; });
$("image").addEventListener("change", () => { $("text").value = ""; $("key").value = ""; });
$("run").addEventListener("change", showRun);
$("search-form").addEventListener("submit", (event) => { event.preventDefault(); search(); });
loadRuns().then(() => {
  if (params.get("text")) { $("text").value = params.get("text"); search(); }
}).catch((error) => { $("status").textContent = error.message; $("status").className = "error"; });
