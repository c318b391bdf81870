// The browser UI: one page per hash route, each drawn from the same JSON API the CLI uses.
// No build step and nothing from the network but this server. A page is one entry in `pages` and
// one link in index.html (an admin's page: its link marked data-admin, its name in ADMIN_PAGES).
// With auth on, nothing draws before a login.

import { mcpPage } from "./mcp.js";

const page = document.getElementById("page");
const errors = document.getElementById("errors");
let leaving = [];  // what the current page must stop (timers, event streams) when another opens
let generation = 0;  // counts page changes: work that finishes after its page has gone is dropped

// -- helpers -----------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function bytes(count) {
  if (count === null || count === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  return seconds < 5400 ? `${Math.round(seconds / 60)} min ago` : `${Math.round(seconds / 3600)} h ago`;
}

function showError(message) {
  errors.replaceChildren(h("p", {}, message));
  errors.scrollIntoView({ block: "nearest" });
}

function clearErrors() { errors.replaceChildren(); }

// -- the session and the one fetch wrapper -----------------------------------------------------

// Who this tab acts as (GET /api/v1/me), and the CSRF token of its session cookie. Kept in memory
// only (the cookie itself is HttpOnly): after a reload /api/v1/me gives the token again.
let me = null;
let csrfToken = null;

// A key-only user's API key, entered on the login page instead of a password. sessionStorage: it
// goes when the tab closes, and no other site's page can read it.
const KEY_STORAGE = "appliance.apiKey";
const UNSAFE = (method) => !["GET", "HEAD", "OPTIONS"].includes(method);

function credentials(method) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) return { authorization: `Bearer ${key}` };
  return csrfToken && UNSAFE(method) ? { "x-csrf-token": csrfToken } : {};
}

// Thrown once the login page has replaced the page: whoever awaited the call shows nothing more.
class SignedOut extends Error {}

// A failed call, with the server's own words and its problem body.
class ApiError extends Error {
  constructor(response, data) {
    const detail = data && (data.detail || (data.error && (data.error.message || data.error))) || response.statusText;
    super(`${detail}${data && data.hint ? ` (${data.hint})` : ""}`);
    this.status = response.status;
    this.data = data;
    this.retryAfter = Number(response.headers.get("retry-after")) || null;
  }
}

async function readBody(response) {
  const text = await response.text();
  try { return text ? JSON.parse(text) : null; } catch { return text; }
}

// Their callers handle a 401 (no session yet, a wrong password or token); any other 401 means the
// session (or the key) is over.
const MODELS_PAGE = 200;  // rows the models page draws before "Show more"
const SIGN_IN_PATHS = new Set(["/api/v1/me", "/api/v1/login", "/api/v1/setup"]);

// Every request of the page goes through here: it sends the key or the session's CSRF token, and
// a 401 anywhere else takes the tab back to the login page.
async function send(method, path, { body, signal } = {}) {
  const response = await fetch(path, {
    method, signal,
    headers: { ...credentials(method), ...(body === undefined ? {} : { "content-type": "application/json" }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && !SIGN_IN_PATHS.has(path)) throw signedOut(new ApiError(response, await readBody(response)));
  return response;
}

// JSON in and out; a problem response becomes an ApiError.
async function api(method, path, body) {
  const response = await send(method, path, { body });
  const data = await readBody(response);
  if (!response.ok && !(path === "/readyz" && response.status === 503)) throw new ApiError(response, data);
  return data;
}

// The first `wanted` rows of a paged list (`?limit=` and the `X-Next-Cursor` header), page by page,
// and whether more follow: a registry of thousands of models is not fetched and drawn whole.
async function firstRows(path, wanted) {
  const rows = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: String(Math.min(1000, wanted - rows.length)) });
    if (cursor) query.set("cursor", cursor);
    const response = await send("GET", `${path}?${query}`);
    const data = await readBody(response);
    if (!response.ok) throw new ApiError(response, data);
    rows.push(...data);
    cursor = response.headers.get("X-Next-Cursor");
  } while (cursor && rows.length < wanted);
  return { rows, more: Boolean(cursor) };
}

// A text/event-stream body read as it comes: onEvent(kind, data) for each `data:` line, kind being
// the event's `event:` name ("message" when it has none). Read through fetch, not EventSource, so
// a tab signed in with an API key sends it too.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", kind = "message";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines.map((raw) => raw.replace(/\r$/, ""))) {
      if (line === "") kind = "message";  // a blank line ends an event
      else if (line.startsWith("event:")) kind = line.slice(6).trim();
      else if (line.startsWith("data:")) onEvent(kind, line.slice(5).replace(/^ /, ""));
    }
  }
}

// Shows what went wrong, unless the login page has taken over.
function report(error) {
  if (!(error instanceof SignedOut)) showError(error.message);
}

// A user's action: the old message goes, a failure shows.
async function attempt(action) {
  try { clearErrors(); return await action(); } catch (error) { report(error); return undefined; }
}

// A redraw after an action, or a timer's: it must not wipe the message the action left.
async function refresh(action) {
  try { return await action(); } catch (error) { report(error); return undefined; }
}

// Stop `stop` when the page that asked for it goes (at once, if it has gone already).
function onLeave(token, stop) {
  if (token !== generation) stop(); else leaving.push(stop);
}

function every(token, seconds, action) {
  const timer = setInterval(action, seconds * 1000);
  onLeave(token, () => clearInterval(timer));
}

// -- dashboard ---------------------------------------------------------------------------------

async function dashboard() {
  const token = generation;
  page.replaceChildren(h("h1", {}, "Dashboard"), h("div", { id: "dashboard" }, "Loading…"));
  const draw = async () => {
    const [ready, ps, system, audit] = await Promise.all([
      api("GET", "/readyz"), api("GET", "/api/v1/ps"), api("GET", "/api/v1/system"), api("GET", "/api/v1/audit?limit=10"),
    ]);
    const cache = system.cache;
    const gpus = system.gpus.length
      ? system.gpus.map((gpu) => h("div", {}, `${gpu.name}: ${bytes(gpu.vram_used_bytes)} of ${bytes(gpu.vram_total_bytes)} VRAM`))
      : [h("div", { class: "muted" }, system.gpu_backends.length ? `${system.gpu_backends.join(", ")} built in, no GPU found: models run on the CPU` : "no GPU (a CPU build)")];
    const devices = h("div", { class: "muted", id: "engine-devices", title: system.llama_cpp_system_info },
      `llama.cpp ${system.llama_cpp_version} runs on: ${system.devices.map((d) => d.name).join(", ")}`);
    document.getElementById("dashboard")?.replaceChildren(
      h("section", { class: "cards" },
        h("div", { class: "card", id: "readiness" },
          h("h2", {}, "Readiness"),
          h("div", { class: ready.ready ? "ok" : "bad" }, ready.ready ? "Ready to serve" : "Not ready"),
          ready.reasons.map((reason) => h("div", { class: "muted" }, reason))),
        h("div", { class: "card" },
          h("h2", {}, "Machine"),
          h("div", {}, `${system.cpu_count} CPUs, load ${system.load_average.map((x) => x.toFixed(2)).join(" ")}`),
          h("div", {}, `RAM: ${bytes(system.memory.available_bytes)} free of ${bytes(system.memory.total_bytes)}`),
          gpus, devices,
          h("div", { class: "muted", id: "engine-choices", title: `${system.engine.parallel_from}; threads: ${system.engine.threads_from}` },
            `Each model: ${system.engine.parallel} requests at once, ${system.engine.threads} threads`)),
        h("div", { class: "card" },
          h("h2", {}, "Cache"),
          h("div", {}, `${bytes(cache.used_bytes)} used of ${cache.max_bytes === null ? "no limit" : bytes(cache.max_bytes)}`),
          cache.max_bytes ? h("progress", { max: cache.max_bytes, value: cache.used_bytes }) : null,
          h("div", { class: "muted" }, `${bytes(system.disk_free_bytes)} free on disk`)),
        h("div", { class: "card", id: "secrets" },
          h("h2", {}, "Secrets"),
          Object.entries(system.secrets).map(([key, state]) => h("div", { class: state === "set" ? "" : "muted" }, `${key}: ${state}`))),
        h("div", { class: "card" },
          h("h2", {}, "Loaded models"),
          ps.models.length ? ps.models.map((m) => h("div", {}, `${m.name} (${bytes(m.memory_bytes)}, ${m.parallel} at once)`)) : h("div", { class: "muted" }, "none"))),
      h("h2", {}, "Recent activity"),
      auditTable(audit));
  };
  await refresh(draw);
  every(token, 5, () => refresh(draw));
}

function auditTable(events) {
  return h("table", {},
    h("thead", {}, h("tr", {}, ["When", "Actor", "Action", "Target", "Outcome", "Bytes", "ms"].map((title) => h("th", {}, title)))),
    h("tbody", {}, events.map((e) => h("tr", {},
      h("td", { class: "mono" }, e.at.replace("T", " ").slice(0, 19)), h("td", {}, e.actor), h("td", {}, e.action),
      h("td", { class: "mono" }, e.target),
      h("td", { class: e.outcome === "ok" ? "ok" : "bad" }, e.outcome === "ok" ? "ok" : `error: ${e.detail.message || ""}`),
      h("td", {}, e.bytes === null ? "" : bytes(e.bytes)), h("td", {}, e.duration_ms ?? "")))));
}

// -- models ------------------------------------------------------------------------------------

// An admin manages models here; anyone else sees the cache read-only.
async function models() {
  const token = generation;
  const manage = isAdmin();
  const pullRef = h("input", { id: "pull-ref", name: "ref", size: 48, placeholder: "https://…, hf:org/repo/file.gguf, oci://…", required: true });
  const pullName = h("input", { id: "pull-name", name: "name", placeholder: "name[:tag] (optional)" });
  const pullDigest = h("input", { id: "pull-digest", name: "digest", size: 30, placeholder: "sha256:… (optional)" });
  const importPath = h("input", { id: "import-path", name: "path", size: 48, placeholder: "/path/on/this/machine/model.gguf", required: true });
  const importName = h("input", { id: "import-name", name: "name", placeholder: "name[:tag] (optional)" });
  const dirPath = h("input", { id: "import-dir-path", name: "path", size: 48, placeholder: "~/.ollama/models or ~/.cache/huggingface/hub, as a full path", required: true });
  const dirCopy = h("input", { id: "import-dir-copy", name: "copy", type: "checkbox" });
  const dirResult = h("div", { id: "import-dir-result" });
  page.replaceChildren(
    h("h1", {}, "Models"),
    ...(manage ? managing() : [h("p", { class: "muted" }, "The models in the cache, read-only: an admin pulls, imports and removes them.")]),
    h("h2", {}, "In the cache"), h("div", { id: "models" }, "Loading…"));

  function managing() {
    return [h("form", { class: "inline", id: "pull-form", onsubmit: (event) => { event.preventDefault(); pull(); } },
        h("label", {}, "Pull a reference", pullRef), h("label", {}, "Name", pullName), h("label", {}, "Digest", pullDigest),
        h("button", { type: "submit" }, "Pull")),
      h("form", { class: "inline", id: "import-form", onsubmit: (event) => { event.preventDefault(); importFile(); } },
        h("label", {}, "Import a file on the server", importPath), h("label", {}, "Name", importName),
        h("button", { type: "submit" }, "Import")),
      h("form", { class: "inline", id: "import-dir-form", onsubmit: (event) => { event.preventDefault(); importDir(); } },
        h("label", {}, "Import from a folder (Ollama or Hugging Face cache) on the server", dirPath),
        h("label", {}, dirCopy, " Copy instead of linking"),
        h("button", { type: "submit" }, "Import folder")),
      dirResult,
      bundleForms(() => refresh(drawModels)),
      h("h2", {}, "Downloads"), h("div", { id: "downloads" })];
  }

  async function pull() {
    const body = { ref: pullRef.value.trim() };
    if (pullName.value.trim()) body.name = pullName.value.trim();
    if (pullDigest.value.trim()) body.digest = pullDigest.value.trim();
    const result = await attempt(() => api("POST", "/api/v1/models/pull", body));
    if (result) { pullRef.value = ""; await Promise.all([drawDownloads(), refresh(drawModels)]); }
  }
  async function importFile() {
    const body = { path: importPath.value.trim() };
    if (importName.value.trim()) body.name = importName.value.trim();
    const result = await attempt(() => api("POST", "/api/v1/models/import", body));
    if (result) { importPath.value = ""; await refresh(drawModels); }
  }
  async function importDir() {
    dirResult.replaceChildren(h("p", { class: "muted" }, "Importing…"));
    const imported = await attempt(() => api("POST", "/api/v1/models/import-dir", { path: dirPath.value.trim(), copy: dirCopy.checked }));
    const verbs = { added: "imported", present: "already present", would_add: "would import", failed: "failed" };
    dirResult.replaceChildren(...(imported ? (imported.models.length ? imported.models.map((m) =>
      h("div", { class: m.status === "failed" ? "bad" : "ok" }, `${verbs[m.status]}: ${m.name ?? m.origin}`,
        ...m.files.map((f) => h("div", { class: "muted" }, `${f.filename} ${f.digest ?? ""} ${f.method ?? ""}`)),
        ...m.not_imported.map((text) => h("div", { class: "muted" }, `not imported: ${text}`)),
        ...m.notes.map((text) => h("div", { class: "muted" }, text)),
        ...(m.error ? [h("div", {}, m.error), h("div", { class: "muted" }, m.hint ?? "")] : []))) : [h("p", { class: "muted" }, "No models found there.")]) : []));
    if (imported) await refresh(drawModels);
  }

  const downloads = new Map();
  const drawDownloads = async () => {
    const found = await refresh(() => api("GET", "/api/v1/downloads"));
    if (!found) return;
    for (const download of found) downloads.set(download.id, download);
    renderDownloads();
  };
  const renderDownloads = () => {
    const rows = [...downloads.values()].sort((a, b) => b.created_at.localeCompare(a.created_at)).slice(0, 20);
    document.getElementById("downloads")?.replaceChildren(rows.length
      ? h("table", { id: "downloads-table" },
        h("thead", {}, h("tr", {}, ["Reference", "Name", "State", "Progress", ""].map((title) => h("th", {}, title)))),
        h("tbody", {}, rows.map(downloadRow)))
      : h("p", { class: "muted" }, "No downloads yet."));
  };
  const downloadRow = (d) => {
    const eta = d.rate_bytes_per_s > 0 && d.bytes_total ? Math.round((d.bytes_total - d.bytes_done) / d.rate_bytes_per_s) : null;
    const progress = d.state === "running"
      ? [h("progress", { max: d.bytes_total || 1, value: d.bytes_done, "aria-label": `progress of ${d.ref}` }),
         ` ${bytes(d.bytes_done)} of ${bytes(d.bytes_total)}, ${bytes(d.rate_bytes_per_s)}/s${eta === null ? "" : `, ${eta} s left`}`]
      : d.state === "done" ? bytes(d.bytes_total) : "";
    const actions = d.state === "pending"
      ? [h("button", { onclick: () => decide(d.id, "approve") }, "Approve"), " ",
         h("button", { class: "danger", onclick: () => decide(d.id, "deny") }, "Deny")]
      : ["running", "queued", "approved"].includes(d.state) ? [h("button", { class: "secondary", onclick: () => cancel(d.id) }, "Cancel")]
      : ["interrupted", "failed", "cancelled"].includes(d.state) ? [h("button", { class: "secondary", onclick: () => resume(d) }, "Resume")] : [];
    return h("tr", { "data-download": d.id, "data-state": d.state },
      h("td", { class: "mono" }, d.ref), h("td", {}, d.model_name || ""),
      h("td", { class: d.state === "failed" || d.state === "denied" ? "bad" : d.state === "done" ? "ok" : "" },
        d.state, d.error ? `: ${d.error}` : "", d.note ? h("div", { class: "muted" }, d.note) : ""),
      h("td", {}, progress), h("td", {}, actions));
  };
  const decide = async (id, verdict) => { await attempt(() => api("POST", `/api/v1/downloads/${id}/${verdict}`)); await drawDownloads(); };
  const cancel = async (id) => { await attempt(() => api("DELETE", `/api/v1/downloads/${id}`)); await drawDownloads(); };
  // Pulling the ref again resumes from the parts on disk (same name and digest as the first pull).
  const resume = async (d) => {
    const body = { ref: d.ref };
    if (d.model_name) body.name = d.model_name;
    if (d.expected_digest) body.digest = d.expected_digest;
    await attempt(() => api("POST", "/api/v1/models/pull", body));
    await Promise.all([drawDownloads(), refresh(drawModels)]);
  };

  let wanted = MODELS_PAGE;
  const drawModels = async () => {
    const [{ rows: list, more }, ps] = await Promise.all([firstRows("/api/v1/models", wanted), manage ? api("GET", "/api/v1/ps") : { models: [] }]);
    const loaded = new Set(ps.models.map((m) => m.name));
    const showMore = more
      ? h("p", {}, h("button", { class: "secondary", id: "models-more", onclick: () => { wanted += MODELS_PAGE; refresh(drawModels); } },
          `Show ${MODELS_PAGE} more (${list.length} shown)`))
      : null;
    document.getElementById("models")?.replaceChildren(list.length ? h("table", { id: "models-table" },
      h("thead", {}, h("tr", {}, ["", "Name", "Formats", "Size", "Digest", "Quantization", "Context", "State", ""].map((title) => h("th", {}, title)))),
      h("tbody", {}, list.map((m) => h("tr", { "data-model": m.name },
        h("td", {}, manage ? h("input", { type: "checkbox", class: "bundle-pick", value: m.name, "aria-label": `select ${m.name} for a bundle` }) : null),
        h("td", {}, m.name), h("td", {}, m.formats.join(", ")), h("td", {}, bytes(m.size_bytes)),
        h("td", { class: "mono", title: m.artifacts.map((a) => `${a.filename}: ${a.digest}`).join("\n") },
          m.artifacts.map((a) => h("div", {}, `${a.filename} ${a.digest.slice(0, 19)}…`))),
        h("td", {}, m.capabilities.quantization || ""), h("td", {}, m.capabilities.context_length || ""),
        h("td", { class: m.state === "ok" ? "" : "bad" }, m.state, m.pinned ? ", pinned" : "", loaded.has(m.name) ? ", loaded" : ""),
        h("td", {}, !manage ? null : [
          h("button", { class: "secondary", onclick: () => modelAction(() => api("POST", "/api/v1/models/verify", { name: m.name })) }, "Verify"), " ",
          h("button", { class: "secondary", onclick: () => modelAction(() => api("PATCH", `/api/v1/models/${m.name}`, { pinned: !m.pinned })) }, m.pinned ? "Unpin" : "Pin"), " ",
          loaded.has(m.name)
            ? h("button", { class: "secondary", onclick: () => modelAction(() => api("POST", "/api/v1/models/unload", { name: m.name })) }, "Unload")
            : h("button", { class: "secondary", onclick: () => modelAction(() => api("POST", "/api/v1/models/load", { name: m.name })) }, "Load"), " ",
          h("button", { class: "danger", onclick: () => { if (confirm(`Delete ${m.name}? Its files leave the cache.`)) modelAction(() => api("DELETE", `/api/v1/models/${m.name}`)); } }, "Delete")])))))
      : h("p", { class: "muted" }, manage ? "No models yet: pull a reference or import a file." : "No models yet."), ...(showMore ? [showMore] : []));
  };
  const modelAction = async (action) => {
    const result = await attempt(action);
    if (Array.isArray(result) && result.some((check) => !check.ok)) showError(result.filter((c) => !c.ok).map((c) => `${c.digest}: ${c.detail}`).join("; "));
    await refresh(drawModels);
  };

  if (!manage) return await refresh(drawModels);
  await Promise.all([drawDownloads(), refresh(drawModels)]);
  if (token !== generation) return;
  // Same origin: the session cookie goes with it (an API key cannot: EventSource sends no headers).
  const events = new EventSource("/api/v1/downloads/events");
  events.addEventListener("download", (event) => {
    const download = JSON.parse(event.data);
    const before = downloads.get(download.id);
    downloads.set(download.id, download);
    renderDownloads();
    if (download.state === "done" && before && before.state !== "done") refresh(drawModels);
  });
  onLeave(token, () => events.close());
}

// Bundles: download the selected models (or all) as a tar; upload one with a progress bar (XHR
// reports upload progress, fetch does not).
function bundleForms(redraw) {
  const file = h("input", { id: "bundle-file", type: "file", accept: ".tar,application/x-tar", required: true });
  const bar = h("progress", { id: "bundle-progress", max: 1, value: 0, hidden: true, "aria-label": "bundle upload" });
  const status = h("span", { id: "bundle-status", class: "muted" });
  const exportBundle = () => {
    const names = [...document.querySelectorAll(".bundle-pick:checked")].map((box) => box.value);
    const query = new URLSearchParams(names.map((name) => ["name", name]));
    // A plain link: the browser sends the session cookie with it and saves the stream to disk.
    const link = h("a", { href: `/api/v1/bundle${names.length ? `?${query}` : ""}`, download: "models.tar", hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
  };
  const importBundle = () => {
    if (!file.files.length) return;
    clearErrors();
    const request = new XMLHttpRequest();
    request.open("POST", "/api/v1/bundle");
    request.setRequestHeader("content-type", "application/x-tar");
    for (const [name, value] of Object.entries(credentials("POST"))) request.setRequestHeader(name, value);
    bar.hidden = false;
    bar.value = 0;
    status.textContent = "uploading…";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) { bar.max = event.total; bar.value = event.loaded; }
      status.textContent = `${bytes(event.loaded)} of ${bytes(event.total)}`;
    });
    request.upload.addEventListener("load", () => { status.textContent = "verifying…"; });
    request.addEventListener("load", () => {
      let data = null;
      try { data = JSON.parse(request.responseText); } catch { data = null; }
      bar.hidden = true;
      if (request.status === 401) { signedOut(new Error((data && data.detail) || request.statusText)); return; }
      if (request.status !== 200) {
        status.textContent = "";
        showError(`${(data && data.detail) || request.statusText}${data && data.hint ? ` (${data.hint})` : ""}`);
        return;
      }
      const done = data.models.map((found) => `${found.model.name}${found.added ? "" : " (already present)"}`);
      status.textContent = `imported ${done.join(", ")}; ${data.blobs_received} blobs received, ${data.blobs_skipped} skipped`;
      file.value = "";
      redraw();
    });
    request.addEventListener("error", () => { bar.hidden = true; status.textContent = ""; showError("the upload failed: the connection was lost"); });
    request.send(file.files[0]);
  };
  return h("form", { class: "inline", id: "bundle-form", onsubmit: (event) => { event.preventDefault(); importBundle(); } },
    h("label", {}, "Import a bundle (.tar)", file),
    h("button", { type: "submit" }, "Import bundle"),
    h("button", { type: "button", class: "secondary", id: "bundle-export", onclick: exportBundle }, "Export bundle (selected, or all)"),
    bar, " ", status);
}

// -- chat --------------------------------------------------------------------------------------

async function chat() {
  const token = generation;
  const choices = ((await attempt(() => api("GET", "/api/v1/models"))) || []).filter((m) => m.formats.includes("gguf"));
  if (token !== generation) return;  // the user went elsewhere while the list loaded
  const model = h("select", { id: "chat-model" }, choices.map((m) => h("option", { value: m.name }, m.name)));
  const system = h("textarea", { id: "chat-system", rows: 3, placeholder: "You are a helpful assistant." });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 32768, value: 256 });
  const prompt = h("textarea", { id: "chat-prompt", rows: 3, placeholder: "Ask something; Ctrl+Enter sends", required: true });
  const log = h("div", { class: "chat-log", id: "chat-log", "aria-live": "polite" });
  const sendButton = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", class: "danger", id: "chat-stop", disabled: true }, "Stop");
  const history = [];
  let controller = null;

  prompt.addEventListener("keydown", (event) => { if (event.key === "Enter" && event.ctrlKey) form.requestSubmit(); });
  stop.addEventListener("click", () => controller?.abort());
  const form = h("form", { onsubmit: (event) => { event.preventDefault(); ask(); } },
    h("div", { class: "chat-layout" },
      h("div", {}, log, h("label", {}, "Message", prompt), h("p", {}, sendButton, " ", stop)),
      h("div", {}, h("label", {}, "Model", model), h("label", {}, "System prompt", system),
        h("label", {}, "Temperature", temperature), h("label", {}, "Max tokens", maxTokens))));
  page.replaceChildren(h("h1", {}, "Chat"), choices.length ? form : h("p", { class: "muted" }, "No GGUF model yet: pull or import one on the Models page."));
  onLeave(token, () => controller?.abort());

  async function ask() {
    const text = prompt.value.trim();
    if (!text) return;
    clearErrors();
    prompt.value = "";
    history.push({ role: "user", content: text });
    log.append(h("div", { class: "user" }, text));
    const answer = h("div", { class: "assistant" });
    log.append(answer);
    const messages = system.value.trim() ? [{ role: "system", content: system.value.trim() }, ...history] : [...history];
    controller = new AbortController();
    sendButton.disabled = true; stop.disabled = false;
    try {
      const response = await send("POST", "/v1/chat/completions", {
        signal: controller.signal,
        body: { model: model.value, messages, stream: true, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) },
      });
      if (!response.ok) {
        const problem = await response.json().catch(() => ({}));
        throw new Error((problem.error && problem.error.message) || response.statusText);
      }
      await readEvents(response, (kind, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        answer.append(chunk.choices?.[0]?.delta?.content || "");
      });
    } catch (error) {
      if (error.name === "AbortError") answer.append(h("span", { class: "muted" }, " [stopped]"));
      else report(error);
    } finally {
      history.push({ role: "assistant", content: answer.firstChild ? answer.textContent.replace(/ \[stopped\]$/, "") : "" });
      sendButton.disabled = false; stop.disabled = true; controller = null;
      prompt.focus();
    }
  }
}

// -- tasks -------------------------------------------------------------------------------------

// The MCP tools a task may be granted: appliance/mcp/types.py's TOOL_NAMES (a test keeps them equal).
const TOOL_NAMES = ["preference.get", "preference.list", "preference.effective", "models.list", "models.show",
  "models.pull", "chat", "embed", "tasks.create", "tasks.get", "tasks.output", "artifacts.list", "artifacts.read",
  "artifacts.write"];

// Create a task (a prompt, a script or commands, with attachments), watch its output as it comes,
// cancel it. The events are read through fetch, not EventSource, so a key-only tab gets them too.
async function tasks() {
  const token = generation;
  const choices = ((await attempt(() => api("GET", "/api/v1/models"))) || []).filter((m) => m.formats.includes("gguf"));
  if (token !== generation) return;
  const mode = h("select", { id: "task-mode" }, ["prompt", "script", "commands"].map((m) => h("option", { value: m }, m)));
  const model = h("select", { id: "task-model" }, choices.map((m) => h("option", { value: m.name }, m.name)));
  const text = h("textarea", { id: "task-text", rows: 5, required: true, placeholder: "A prompt, a script, or commands (one per line)" });
  const files = h("input", { id: "task-files", type: "file", multiple: true });
  const inference = h("input", { id: "task-inference", type: "checkbox" });
  const tools = TOOL_NAMES.map((name) => h("input", { type: "checkbox", name: "task-tool", value: name }));
  const create = h("button", { type: "submit", id: "task-create" }, "Create");
  const list = h("tbody", { id: "tasks-table" });
  const watched = h("section", { id: "task-watch" });
  let reading = null;  // the AbortController of the event stream being read
  onLeave(token, () => reading?.abort());

  const form = h("form", { onsubmit: (event) => { event.preventDefault(); attempt(submit); } },
    h("label", {}, "Mode", mode), h("label", {}, "Model (prompts)", model), h("label", {}, "Text", text),
    h("label", {}, "Attachments (scripts and commands: in /work)", files),
    h("label", {}, inference, " Inference (scripts and commands may call models at $INFERENCE_URL and $OLLAMA_BASE_URL)"),
    h("fieldset", { id: "task-tools" }, h("legend", {}, "MCP tools (scripts and commands may call them at $MCP_URL)"),
      ...tools.map((box) => h("label", {}, box, ` ${box.value}`))),
    h("p", {}, create));
  page.replaceChildren(h("h1", {}, "Tasks"), form, watched,
    h("h2", {}, "Recent tasks"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Task"), h("th", {}, "State"), h("th", {}, "Mode"), h("th", {}, "Created"))), list));
  await drawList();
  every(token, 2, () => refresh(drawList));

  async function drawList() {
    const found = await api("GET", "/api/v1/tasks?limit=20");
    if (token !== generation) return;
    list.replaceChildren(...found.map((task) => h("tr", { "data-state": task.state },
      h("td", {}, h("a", { href: "#/tasks", onclick: (event) => { event.preventDefault(); watch(task); } }, task.id.slice(0, 12))),
      h("td", {}, task.state), h("td", {}, task.mode), h("td", {}, task.created_at))));
  }

  async function submit() {
    const body = new FormData();
    body.append("mode", mode.value);
    body.append("text", text.value);
    if (mode.value === "prompt" && model.value) body.append("model", model.value);
    if (mode.value !== "prompt" && inference.checked) body.append("inference", "true");
    if (mode.value !== "prompt") for (const box of tools) if (box.checked) body.append("tools", box.value);
    for (const file of files.files) body.append("attachment", file, file.name);
    const response = await fetch("/api/v1/tasks", { method: "POST", headers: credentials("POST"), body });
    const data = await readBody(response);
    if (response.status === 401) throw signedOut(new ApiError(response, data));
    if (!response.ok) throw new ApiError(response, data);
    text.value = ""; files.value = "";
    await drawList();
    watch(data);
  }

  async function watch(task) {
    reading?.abort();
    const controller = reading = new AbortController();
    const state = h("p", { id: "task-state" }, `${task.id.slice(0, 12)}: ${task.state}`);
    const stdout = h("pre", { id: "task-stdout", "aria-live": "polite" });
    const stderr = h("pre", { id: "task-stderr", class: "muted" });
    const cancel = h("button", { type: "button", class: "danger", id: "task-cancel",
      onclick: () => attempt(async () => { await api("POST", `/api/v1/tasks/${task.id}/cancel`); }) }, "Cancel");
    watched.replaceChildren(h("h2", {}, "Output"), state, stdout, stderr, h("p", {}, cancel));
    const show = (current) => {
      const reason = current.result && current.result.reason ? ` (${current.result.reason})` : "";
      state.textContent = `${current.id.slice(0, 12)}: ${current.state}${reason}`;
      cancel.disabled = ["succeeded", "failed", "canceled"].includes(current.state);
    };
    show(task);
    try {
      const response = await send("GET", `/api/v1/tasks/${task.id}/events`, { signal: controller.signal });
      if (!response.ok) throw new ApiError(response, await readBody(response));
      await readEvents(response, (kind, text) => {
        const data = JSON.parse(text);
        if (kind === "output") (data.stream === "stderr" ? stderr : stdout).append(data.text);
        else if (kind === "state" || kind === "end") show(data);
        else if (kind === "error") throw new Error(data.detail);
      });
    } catch (error) {
      if (error.name !== "AbortError") report(error);
    }
  }
}

// -- nodes -------------------------------------------------------------------------------------

// Workers that joined this server: their state and heartbeat, machine, load and models, redrawn
// every few seconds; join tokens to add one; drain, remove, and the models each keeps loaded.
async function nodes() {
  const token = generation;
  const expires = h("select", { id: "token-expires" },
    [["24h", "24 hours"], ["1h", "1 hour"], ["7d", "7 days"], ["never", "never"]].map(([value, label]) => h("option", { value }, label)));
  const created = h("div", { id: "new-token" });
  const tokenList = h("div", { id: "tokens" }, "Loading…");
  const serverList = h("div", { id: "servers" }, "Loading…");
  const list = h("div", { id: "nodes" }, "Loading…");
  const picked = new Map();  // node id -> the model chosen in its select, kept across redraws
  const found = await refresh(() => firstRows("/api/v1/models", 1000));
  if (token !== generation) return;
  const choices = (found ? found.rows : []).filter((m) => m.formats.includes("gguf")).map((m) => m.name);

  const draw = async () => {
    const listed = await api("GET", "/api/v1/nodes");
    if (token !== generation) return;
    list.replaceChildren(listed.length ? h("table", { id: "nodes-table" },
      h("thead", {}, h("tr", {}, ["Name", "State", "Heartbeat", "Machine", "Load", "Models", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, listed.map(nodeRow)))
      : h("p", { class: "muted" }, "No node has joined yet: make a join token below and run the line it shows on the worker."));
  };
  // A timer's redraw waits while a model is being picked: it would close the open select.
  const redraw = () => {
    const focused = document.activeElement;
    if (focused && focused.tagName === "SELECT" && list.contains(focused)) return undefined;
    return refresh(draw);
  };

  const nodeRow = (n) => {
    const caps = n.capabilities || {};
    const memory = caps.memory || {};
    const gpus = caps.gpus || [];
    const since = n.seconds_since_heartbeat;
    return h("tr", { "data-node": n.name, "data-state": n.state },
      h("td", {}, h("strong", {}, n.name), h("div", { class: "muted mono" }, n.id)),
      h("td", { class: `node-state ${n.state === "ready" ? "ok" : n.state === "unavailable" ? "bad" : ""}` }, n.state),
      h("td", { class: "node-heartbeat", title: n.last_heartbeat_at || "" }, since === null ? "never" : ago(since)),
      Object.keys(caps).length === 0 ? h("td", { class: "node-machine muted" }, "not reported yet") : h("td", { class: "node-machine" },
        h("div", {}, `${caps.cpu?.count ?? "?"} CPUs, RAM ${bytes(memory.available_bytes)} free of ${bytes(memory.total_bytes)}`),
        gpus.length
          ? gpus.map((gpu) => h("div", { class: "node-gpu" }, `${gpu.name}: ${bytes(gpu.vram_used_bytes)} of ${bytes(gpu.vram_total_bytes)} VRAM`))
          : h("div", { class: "muted node-gpu" }, "no GPU"),
        caps.memory_budget === undefined ? null : h("div", { class: "muted" }, `engine budget ${bytes(caps.memory_budget)}`),
        caps.version ? h("div", { class: "muted" }, `version ${caps.version}`) : null),
      h("td", { class: "node-load" }, `${n.load?.active ?? 0} running, ${n.load?.queued ?? 0} queued`),
      h("td", { class: "node-models" }, nodeModels(n)),
      h("td", { class: "node-actions" },
        n.state === "draining"
          ? h("button", { class: "secondary", onclick: () => act(() => api("POST", `/api/v1/nodes/${encodeURIComponent(n.id)}/undrain`)) }, "Undrain")
          : h("button", { class: "secondary", onclick: () => act(() => api("POST", `/api/v1/nodes/${encodeURIComponent(n.id)}/drain`)) }, "Drain"), " ",
        h("button", { class: "danger", onclick: () => remove(n) }, "Remove")));
  };

  // What the node holds as it reported (cached, loading, available, failed and why), and what it
  // is told to keep loaded but has not reported yet; a model it is told to load can be unloaded.
  const nodeModels = (n) => {
    const assigned = n.config?.models || [];
    const told = new Map(assigned.map((e) => [e.digest, e]));
    const held = new Set(n.models.map((m) => m.digest));
    const unload = (name) => h("button", { class: "secondary", onclick: () => act(() =>
      api("DELETE", `/api/v1/nodes/${encodeURIComponent(n.id)}/models/${name.split("/").map(encodeURIComponent).join("/")}`)) }, "Unload");
    const rows = [
      ...n.models.map((m) => h("div", { class: "node-model", "data-model": m.model, "data-state": m.state },
        h("span", {}, m.model || m.digest.slice(0, 19)), " ",
        h("span", { class: m.state === "available" ? "ok" : m.state === "failed" ? "bad" : "" }, m.state),
        m.reason ? h("span", { class: "muted" }, `: ${m.reason}`) : null,
        told.has(m.digest) ? [" ", unload(told.get(m.digest).model)] : null)),
      ...assigned.filter((e) => !held.has(e.digest)).map((e) => h("div", { class: "node-model", "data-model": e.model, "data-state": "assigned" },
        h("span", {}, e.model), " ", h("span", { class: "muted" }, "told to load, not reported yet"), " ", unload(e.model))),
    ];
    const select = h("select", { class: "node-pick", "aria-label": `model to load on ${n.name}`,
      onchange: (event) => picked.set(n.id, event.target.value) }, choices.map((name) => h("option", { value: name }, name)));
    if (picked.has(n.id) && choices.includes(picked.get(n.id))) select.value = picked.get(n.id);
    // A node that never acknowledged a config and is told nothing has nothing to apply.
    const pending = n.config_applied !== n.config_version && (assigned.length > 0 || n.config_applied !== null);
    return [...(rows.length ? rows : [h("div", { class: "muted" }, "none")]),
      pending ? h("div", { class: "muted node-config" }, "config not applied yet") : null,
      choices.length
        ? h("form", { class: "inline node-load-form", onsubmit: (event) => { event.preventDefault();
            act(() => api("POST", `/api/v1/nodes/${encodeURIComponent(n.id)}/models`, { model: select.value })); } },
          select, h("button", { type: "submit" }, "Load"))
        : h("div", { class: "muted" }, "No GGUF model registered to load.")];
  };

  const act = async (action) => { if (await attempt(action)) await refresh(draw); };
  const remove = async (n) => {
    if (!confirm(`Remove node ${n.name}? Its credential stops working and its work in flight fails; it must join again.`)) return;
    await act(() => api("DELETE", `/api/v1/nodes/${encodeURIComponent(n.id)}`));
  };

  const drawTokens = async () => {
    const tokens = await api("GET", "/api/v1/nodes/tokens");
    if (token !== generation) return;
    tokenList.replaceChildren(tokens.length ? h("table", { id: "tokens-table" },
      h("thead", {}, h("tr", {}, ["Token", "State", "Made by", "Created", "Expires", "Uses", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, tokens.map((t) => h("tr", { "data-token": t.id, "data-state": t.state },
        h("td", { class: "mono" }, t.id), h("td", { class: t.state === "active" ? "ok" : "bad" }, t.state),
        h("td", {}, t.created_by), h("td", {}, t.created_at.slice(0, 19)),
        h("td", {}, t.expires_at ? t.expires_at.slice(0, 19) : "never"), h("td", {}, t.uses),
        h("td", {}, t.state === "active" ? h("button", { class: "danger", onclick: () => revoke(t) }, "Revoke") : null)))))
      : h("p", { class: "muted" }, "No join tokens yet."));
  };
  // The servers sharing this database, each with its own blob cache: what it fetches from the others.
  const drawServers = async () => {
    const listed = await api("GET", "/api/v1/servers");
    if (token !== generation) return;
    serverList.replaceChildren(h("table", { id: "servers-table" },
      h("thead", {}, h("tr", {}, ["Server", "URL", "State", "Version", "Last seen"].map((t) => h("th", {}, t)))),
      h("tbody", {}, listed.map((s) => h("tr", { "data-server": s.id, "data-state": s.alive ? "alive" : "gone" },
        h("td", { class: "mono" }, s.id, s.this ? h("span", { class: "muted" }, " (this one)") : null),
        h("td", { class: "mono" }, s.url), h("td", { class: s.alive ? "ok" : "bad" }, s.alive ? "alive" : "gone"),
        h("td", {}, s.version), h("td", {}, s.last_seen_at.slice(0, 19)))))));
  };
  const revoke = async (t) => {
    if (!confirm(`Revoke join token ${t.id}? No worker can join with it any more; the nodes that joined with it stay.`)) return;
    if (await attempt(() => api("DELETE", `/api/v1/nodes/tokens/${encodeURIComponent(t.id)}`))) await refresh(drawTokens);
  };
  const create = async () => {
    const made = await attempt(() => api("POST", "/api/v1/nodes/tokens", { expires: expires.value }));
    if (!made) return;
    // Shown once: the server keeps only its hash.
    const command = h("code", { id: "new-token-command" }, `appliance worker join ${location.origin} --token ${made.token}`);
    const copied = h("span", { class: "muted" });
    const copy = async () => {
      try { await navigator.clipboard.writeText(command.textContent); copied.textContent = " copied"; }
      catch { getSelection().selectAllChildren(command); copied.textContent = " selected: copy it with Ctrl+C"; }
    };
    created.replaceChildren(h("div", { class: "card" },
      h("p", {}, h("strong", {}, "The new join token. Copy it now: it will not be shown again."),
        ` It expires ${made.expires_at ? made.expires_at.slice(0, 19).replace("T", " ") + " UTC" : "never"}.`),
      h("p", {}, h("code", { id: "new-token-secret" }, made.token)),
      h("p", {}, "On the worker, run:"),
      h("pre", {}, command),
      h("p", {}, h("button", { type: "button", class: "secondary", id: "new-token-copy", onclick: copy }, "Copy the line"), copied)));
    await refresh(drawTokens);
  };

  page.replaceChildren(h("h1", {}, "Nodes"),
    h("p", { class: "muted" }, "Workers that joined this server. A worker opens every connection itself: it needs no open port."),
    h("div", { id: "nodes-wrap" }, list),
    h("h2", {}, "Join tokens"),
    h("form", { class: "inline", id: "token-form", onsubmit: (event) => { event.preventDefault(); create(); } },
      h("label", {}, "Expires in", expires), h("button", { type: "submit" }, "Create join token")),
    created, tokenList,
    h("h2", {}, "Servers on this database"),
    h("p", { class: "muted" }, "Each keeps its own model cache and fetches a model it lacks from the others."),
    serverList);
  await Promise.all([refresh(draw), refresh(drawTokens), refresh(drawServers)]);
  every(token, 3, () => Promise.all([redraw(), refresh(drawTokens), refresh(drawServers)]));
}

// -- providers ---------------------------------------------------------------------------------

// External providers: a key is write-only here as everywhere. Its field is a password field that
// is emptied as soon as it is sent and never filled back; the list says only "set" or "unset".
async function providers() {
  const token = generation;
  const name = h("input", { id: "provider-name", required: true, placeholder: "openai" });
  const kind = h("select", { id: "provider-kind" }, ["openai", "anthropic"].map((k) => h("option", { value: k }, k)));
  const baseUrl = h("input", { id: "provider-base-url", required: true, size: 36, placeholder: "https://api.openai.com/v1" });
  const modelsField = h("input", { id: "provider-models", size: 28, placeholder: "gpt-4o, gpt-4o-mini (empty: any)" });
  const operations = h("input", { id: "provider-operations", size: 26, value: "chat, complete, embed, models" });
  const subjects = h("input", { id: "provider-subjects", size: 16, value: "*" });
  const key = h("input", { id: "provider-key", type: "password", autocomplete: "off", size: 28, placeholder: "its API key (optional)" });
  const routing = h("div", { id: "provider-routing", class: "card" }, "Loading…");
  const list = h("div", { id: "providers" }, "Loading…");
  const results = new Map();  // provider name -> its last test, kept across redraws
  const listed = (text) => text.split(",").map((part) => part.trim()).filter(Boolean);

  const draw = async () => {
    const found = await api("GET", "/api/v1/providers");
    if (token !== generation) return;
    list.replaceChildren(found.length ? h("table", { id: "providers-table" },
      h("thead", {}, h("tr", {}, ["Name", "Kind", "Base URL", "Models", "Key", "Operations", "Subjects", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, found.map(providerRow)))
      : h("p", { class: "muted" }, "No provider yet: add one below (or with appliance providers add)."));
  };
  const providerRow = (p) => h("tr", { "data-provider": p.name },
    h("td", {}, h("strong", {}, p.name)), h("td", {}, p.kind), h("td", { class: "mono" }, p.base_url),
    h("td", {}, p.models.length ? p.models.join(", ") : h("span", { class: "muted" }, "any")),
    h("td", { class: `provider-key ${p.key_set ? "ok" : "muted"}` }, p.key_set ? "set" : "unset"),
    h("td", {}, p.operations.join(", ")), h("td", { class: "mono" }, p.subjects.join(", ")),
    h("td", { class: "provider-actions" },
      h("button", { class: "secondary", onclick: () => test(p) }, "Test"), " ",
      h("button", { class: "secondary", onclick: (event) => changeKey(p, event.target) }, "Change key"), " ",
      p.key_set ? [h("button", { class: "secondary", onclick: () => clearKey(p) }, "Clear key"), " "] : null,
      h("button", { class: "danger", onclick: () => remove(p) }, "Remove"),
      h("div", { class: "provider-test" }, results.get(p.name) ?? null)));

  // The probe's answer: reachable with its key (and the models it lists), or what went wrong.
  const test = async (p) => {
    results.set(p.name, h("span", { class: "muted" }, "testing…"));
    await refresh(draw);
    const probe = await attempt(() => api("POST", `/api/v1/providers/${encodeURIComponent(p.name)}/test`));
    results.set(p.name, !probe ? h("span", { class: "bad" }, "test failed: see the message above")
      : probe.ok
        ? h("span", { class: "ok" }, `reachable (HTTP ${probe.status}, ${probe.seconds.toFixed(2)} s)`,
            probe.models.length ? h("div", { class: "muted" }, `lists ${probe.models.length} models: ${probe.models.slice(0, 10).join(", ")}${probe.models.length > 10 ? ", …" : ""}`) : null)
        : h("span", { class: "bad" }, `not reachable${probe.status ? ` (HTTP ${probe.status})` : ""}: ${probe.error ?? "no answer"}`));
    await refresh(draw);
  };
  // A password field of its own in the row; sent once, then gone with the form.
  const changeKey = (p, button) => {
    const field = h("input", { type: "password", autocomplete: "off", class: "provider-new-key", "aria-label": `new key of ${p.name}`, required: true });
    const form = h("form", { class: "inline", onsubmit: async (event) => {
      event.preventDefault();
      const saved = await attempt(() => api("PATCH", `/api/v1/providers/${encodeURIComponent(p.name)}`, { key: field.value }));
      field.value = "";
      if (saved) await refresh(draw);
    } }, field, h("button", { type: "submit" }, "Save key"));
    button.closest("td").append(form);
    field.focus();
  };
  const clearKey = async (p) => {
    if (!confirm(`Clear the key of ${p.name}? Calls to it are then made without one.`)) return;
    if (await attempt(() => api("PATCH", `/api/v1/providers/${encodeURIComponent(p.name)}`, { key: null }))) await refresh(draw);
  };
  const remove = async (p) => {
    if (!confirm(`Remove ${p.name} and its key? Model calls are no longer routed to it.`)) return;
    // 204: no body, so the call says itself that it went through.
    if (await attempt(async () => { await api("DELETE", `/api/v1/providers/${encodeURIComponent(p.name)}`); return true; })) {
      results.delete(p.name);
      await refresh(draw);
    }
  };
  const add = async () => {
    const body = { name: name.value.trim(), kind: kind.value, base_url: baseUrl.value.trim(), models: listed(modelsField.value),
      operations: listed(operations.value), subjects: listed(subjects.value) };
    if (key.value) body.key = key.value;
    key.value = "";  // sent or not, it is not kept in the page
    const added = await attempt(() => api("POST", "/api/v1/providers", body));
    if (!added) return;
    name.value = ""; baseUrl.value = ""; modelsField.value = "";
    await refresh(draw);
  };
  // The two routing preferences, as the Settings page edits them.
  const drawRouting = async () => {
    const preferences = await api("GET", "/api/v1/preferences");
    if (token !== generation) return;
    const value = (wanted) => preferences.find((p) => p.key === wanted)?.value;
    const preferLocal = value("model_routing.prefer_local");
    const allowed = value("model_routing.allowed_external_providers");
    routing.replaceChildren(h("h2", {}, "Routing"),
      h("div", { id: "routing-prefer-local" }, h("strong", {}, "model_routing.prefer_local: "),
        preferLocal === undefined ? "unknown" : preferLocal ? "yes (a provider only when no local path fits)" : "no (an allowed provider first)"),
      h("div", { id: "routing-allowed" }, h("strong", {}, "model_routing.allowed_external_providers: "),
        allowed === undefined ? "unknown" : allowed.length ? allowed.join(", ") : "none (no call is routed to a provider)"),
      h("p", {}, h("a", { href: "#/settings", id: "routing-settings" }, "Change them on the Settings page")));
  };

  page.replaceChildren(h("h1", {}, "Providers"),
    h("p", { class: "muted" }, "External OpenAI-compatible or Anthropic APIs that model calls may be routed to, where routing allows. Their keys are stored encrypted and never shown again."),
    routing,
    h("h2", {}, "Configured providers"), list,
    h("h2", {}, "Add a provider"),
    h("form", { class: "inline", id: "provider-form", onsubmit: (event) => { event.preventDefault(); add(); } },
      h("label", {}, "Name", name), h("label", {}, "Kind", kind), h("label", {}, "Base URL", baseUrl),
      h("label", {}, "Models", modelsField), h("label", {}, "Operations", operations), h("label", {}, "Subjects", subjects),
      h("label", {}, "Key", key), h("button", { type: "submit" }, "Add provider")));
  await Promise.all([refresh(draw), refresh(drawRouting)]);
}

// -- audit -------------------------------------------------------------------------------------

async function audit() {
  const token = generation;
  const action = h("input", { id: "audit-action", placeholder: "models.pull" });
  const actor = h("input", { id: "audit-actor", placeholder: "cli:alice" });
  const since = h("input", { id: "audit-since", type: "datetime-local" });
  const until = h("input", { id: "audit-until", type: "datetime-local" });
  const results = h("div", { id: "audit-results" });
  const search = async () => {
    const query = new URLSearchParams({ limit: "200" });
    if (action.value.trim()) query.set("action", action.value.trim());
    if (actor.value.trim()) query.set("actor", actor.value.trim());
    if (since.value) query.set("since", new Date(since.value).toISOString());
    if (until.value) query.set("until", new Date(until.value).toISOString());
    const events = await attempt(() => api("GET", `/api/v1/audit?${query}`));
    if (events && token === generation) results.replaceChildren(events.length ? auditTable(events) : h("p", { class: "muted" }, "Nothing matches."));
  };
  page.replaceChildren(h("h1", {}, "Audit log"),
    h("form", { class: "inline", onsubmit: (event) => { event.preventDefault(); search(); } },
      h("label", {}, "Action", action), h("label", {}, "Actor", actor), h("label", {}, "Since", since), h("label", {}, "Until", until),
      h("button", { type: "submit" }, "Filter")),
    results);
  await search();
}

// -- settings ----------------------------------------------------------------------------------

async function settings() {
  page.replaceChildren(h("h1", {}, "Settings"), h("p", { class: "muted" },
    "Preferences override the appliance's settings while it runs; Reset goes back to the setting."), h("div", { id: "preferences" }, "Loading…"),
    h("h2", {}, "Database"), h("div", { id: "database" }, "Loading…"));
  const draw = async () => {
    const preferences = await api("GET", "/api/v1/preferences");
    document.getElementById("preferences")?.replaceChildren(...preferences.map(preferenceForm));
  };
  const preferenceForm = (p) => {
    const id = `pref-${p.key.replaceAll(".", "-")}`;
    let control, read;
    if (typeof p.setting === "boolean") {
      control = h("input", { id, type: "checkbox", checked: p.value === true });
      read = () => control.checked;
    } else if (Array.isArray(p.setting)) {
      control = h("textarea", { id, rows: 3, cols: 40 });
      control.value = p.value.join("\n");
      read = () => control.value.split("\n").map((line) => line.trim()).filter(Boolean);
    } else if (p.key === "models.cache.evict_policy") {
      control = h("select", { id }, ["lru", "none"].map((v) => h("option", { value: v, selected: v === p.value }, v)));
      read = () => control.value;
    } else {
      control = h("input", { id, value: p.value ?? "", placeholder: p.key === "models.cache.max_bytes" ? "e.g. 500GB" : "" });
      read = () => control.value.trim() === "" ? null : control.value.trim();
    }
    const save = async (value) => {
      const saved = await attempt(() => api("PUT", `/api/v1/preferences/${p.key}`, { value }));
      if (saved) await refresh(draw);
    };
    return h("form", { class: "inline card", "data-key": p.key, onsubmit: (event) => { event.preventDefault(); save(read()); } },
      h("label", { for: id }, h("strong", {}, p.key), p.description, control),
      h("button", { type: "submit" }, "Save"),
      p.overridden ? h("button", { type: "button", class: "secondary", onclick: () => save(null) }, "Reset") : null,
      h("span", { class: "muted" }, p.overridden ? `setting: ${JSON.stringify(p.setting)}` : "from the settings"));
  };
  await attempt(draw);
  await attempt(database);
}

// The store's status. Migrating and copying are the CLI's (operator actions on a database): shown as
// the commands to run.
async function database() {
  const db = await api("GET", "/api/v1/db");
  const facts = [
    ["Backend", db.backend === "sqlite" ? "SQLite" : "PostgreSQL"],
    ["Location", db.location],
    db.schema_name === null ? null : ["Schema", db.schema_name],
    ["Schema version", db.schema_version ?? "none"],
    ["Pending migrations", db.pending.length ? db.pending.join(", ") : "none"],
    db.newer.length ? ["Applied by a newer appliance", db.newer.join(", ")] : null,
  ].filter(Boolean);
  const hint = db.backend === "sqlite"
    ? ["To move this registry to PostgreSQL (several servers on one database), stop the server and run ",
      h("code", {}, "appliance db copy --to postgresql://USER@HOST/DATABASE"),
      ", then serve with ", h("code", {}, "--database postgresql://…"), "."]
    : ["Servers on this database share its registry, downloads and tasks. ", h("code", {}, "appliance db status"),
      " shows the same; ", h("code", {}, "appliance db migrate"), " applies pending migrations."];
  document.getElementById("database")?.replaceChildren(
    h("section", { class: "card", id: "database-facts" },
      facts.map(([label, value]) => h("div", {}, h("strong", {}, `${label}: `), h("span", { class: "mono" }, value))),
      db.pending.length ? h("div", { class: "bad" }, "Run appliance db migrate (or restart the server) to apply the pending migrations.") : null),
    h("p", { class: "muted", id: "database-hint" }, hint),
    h("table", { id: "database-tables" },
      h("thead", {}, h("tr", {}, h("th", {}, "Table"), h("th", {}, "Rows"))),
      h("tbody", {}, Object.entries(db.tables).map(([name, rows]) => h("tr", {}, h("td", { class: "mono" }, name), h("td", {}, rows))))));
}

// -- keys and users ----------------------------------------------------------------------------

// The keys the signed-in user may see: their own ("My keys"); an admin's: everyone's.
async function keys() {
  const token = generation;
  const name = h("input", { id: "key-name", placeholder: "laptop (optional)" });
  const expires = h("select", { id: "key-expires" },
    [["", "never"], ["12h", "12 hours"], ["30d", "30 days"], ["8w", "8 weeks"]].map(([value, label]) => h("option", { value }, label)));
  const created = h("div", { id: "new-key" });
  const list = h("div", { id: "keys" }, "Loading…");
  const draw = async () => {
    const found = await api("GET", "/api/v1/keys");
    if (token !== generation) return;
    list.replaceChildren(found.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Name", "Key", "Role", "User", "State", "Created", "Expires", "Last used", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, found.map((k) => h("tr", { "data-id": k.id },
        h("td", {}, k.name), h("td", { class: "mono" }, `${k.prefix}…`), h("td", {}, k.role), h("td", {}, k.user || "-"),
        h("td", { class: k.state === "active" ? "ok" : "bad" }, k.state), h("td", {}, k.created_at.slice(0, 19)),
        h("td", {}, k.expires_at ? k.expires_at.slice(0, 19) : "never"), h("td", {}, k.last_used_at ? k.last_used_at.slice(0, 19) : "never"),
        h("td", {}, k.state === "revoked" ? null : h("button", { class: "danger", onclick: () => revoke(k) }, "Revoke"))))))
      : h("p", { class: "muted" }, "No keys yet."));
  };
  const revoke = async (k) => {
    if (!confirm(`Revoke ${k.name} (${k.prefix}…)? Whatever uses it is refused at once.`)) return;
    if (await attempt(() => api("DELETE", `/api/v1/keys/${k.id}`))) await refresh(draw);
  };
  const create = async () => {
    const body = { name: name.value.trim() };
    if (expires.value) body.expires = expires.value;
    const made = await attempt(() => api("POST", "/api/v1/keys", body));
    if (!made) return;
    // Shown once: the server keeps only its hash.
    created.replaceChildren(h("div", { class: "card" },
      h("p", {}, h("strong", {}, "Your new key. Copy it now: it will not be shown again.")),
      h("code", { id: "new-key-secret" }, made.key)));
    name.value = "";
    await refresh(draw);
  };
  page.replaceChildren(h("h1", {}, isAdmin() ? "API keys" : "My keys"),
    h("p", { class: "muted" }, isAdmin() ? "Every user's keys; the ones made here are yours." : "Keys for programs that call the API as you (openai, ollama, curl)."),
    h("h2", {}, "Make a key"),
    h("form", { class: "inline", onsubmit: (event) => { event.preventDefault(); create(); } },
      h("label", {}, "Name", name), h("label", {}, "Expires", expires), h("button", { type: "submit" }, "Create key")),
    created,
    h("h2", {}, "Keys"), list);
  await attempt(draw);
}

async function users() {
  const token = generation;
  const name = h("input", { id: "user-name", required: true, placeholder: "alice" });
  const role = h("select", { id: "user-role" }, ["user", "admin", "node"].map((r) => h("option", { value: r }, r)));
  const password = h("input", { id: "user-password", type: "password", autocomplete: "new-password", placeholder: "10 characters or more (optional)" });
  const list = h("div", { id: "users" }, "Loading…");
  const draw = async () => {
    const found = await api("GET", "/api/v1/users");
    if (token !== generation) return;
    list.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Name", "Role", "Password", "Created", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, found.map((u) => h("tr", { "data-name": u.name },
        h("td", {}, u.name), h("td", {}, u.role), h("td", {}, u.has_password ? "set" : "none"), h("td", {}, u.created_at.slice(0, 19)),
        h("td", {}, h("button", { class: "danger", onclick: () => remove(u) }, "Remove")))))));
  };
  const remove = async (u) => {
    if (!confirm(`Remove ${u.name} and their API keys?`)) return;
    if (await attempt(() => api("DELETE", `/api/v1/users/${encodeURIComponent(u.name)}`))) await refresh(draw);
  };
  const add = async () => {
    const body = { name: name.value.trim(), role: role.value };
    if (password.value) body.password = password.value;
    if (await attempt(() => api("POST", "/api/v1/users", body))) {
      name.value = ""; password.value = "";
      await refresh(draw);
    }
  };
  page.replaceChildren(h("h1", {}, "Users"),
    h("p", { class: "muted" }, "Admins only. A user's keys are made on the Keys page (or with appliance keys create --user NAME)."),
    h("form", { class: "inline", onsubmit: (event) => { event.preventDefault(); add(); } },
      h("label", {}, "Name", name), h("label", {}, "Role", role), h("label", {}, "Password", password),
      h("button", { type: "submit" }, "Add user")),
    list);
  await attempt(draw);
}

// -- signing in --------------------------------------------------------------------------------

const nav = document.querySelector("nav");
const account = document.getElementById("account");
let loginShown = false;  // the login (or setup) page is up: nothing else draws until someone signs in

function isAdmin() { return me !== null && me.role === "admin"; }

// Asks the server who this tab is; signed in (or auth off): the page the address names, else the login page.
async function start() {
  const response = await send("GET", "/api/v1/me");
  const data = await readBody(response);
  if (response.status === 401) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    const login = await api("GET", "/api/v1/login").catch(() => null);  // says whether the first admin is still to be made
    return showLogin({ message: key ? `the API key was refused: ${new ApiError(response, data).message}` : "", setup: login?.setup === true });
  }
  if (!response.ok) throw new ApiError(response, data);
  me = data;
  csrfToken = data.csrf_token ?? null;
  loginShown = false;
  nav.hidden = false;
  for (const link of nav.querySelectorAll("a[data-admin]")) link.hidden = !isAdmin();
  nav.querySelector("a[data-page='keys']").textContent = isAdmin() ? "Keys" : "My keys";
  account.hidden = !me.auth;
  document.getElementById("account-name").textContent = `${me.name} (${me.role})`;
  await route();
}

// The tab's session or key has gone (a 401 on some call): back to the login page, saying why.
function signedOut(error) {
  if (!loginShown) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    showLogin({ message: key ? `the API key was refused: ${error.message}` : "Your session expired: sign in again." });
  }
  return new SignedOut(error.message);
}

async function logOut() {
  if (sessionStorage.getItem(KEY_STORAGE)) sessionStorage.removeItem(KEY_STORAGE);
  else if (!(await attempt(() => api("POST", "/api/v1/logout")))) return;
  if (!loginShown) showLogin({ message: "You have logged out." });
}

function showLogin({ message = "", setup = false }) {
  me = null;
  csrfToken = null;
  loginShown = true;
  leavePage();
  clearErrors();
  nav.hidden = true;
  account.hidden = true;
  if (setup) setupView(); else loginView(message);
}

// A 429 says for how long; any other failure is the server's own words.
function signInFailed(error) {
  if (error instanceof ApiError && error.status === 429) showError(`too many attempts, try again in ${error.retryAfter ?? "a few"} s`);
  else report(error);
}

async function signIn(path, body) {
  clearErrors();
  sessionStorage.removeItem(KEY_STORAGE);  // a password login replaces a key
  try {
    await api("POST", path, body);
    await start();
    return true;
  } catch (error) {
    signInFailed(error);
    return false;
  }
}

function loginView(message) {
  const name = h("input", { id: "login-name", autocomplete: "username", required: true });
  const password = h("input", { id: "login-password", type: "password", autocomplete: "current-password", required: true });
  const key = h("input", { id: "api-key", type: "password", size: 52, autocomplete: "off", placeholder: "apl_…", required: true });
  const keyForm = h("form", { class: "inline", id: "key-form", hidden: true, onsubmit: (event) => { event.preventDefault(); useKey(); } },
    h("label", {}, "API key (this tab keeps it until it closes)", key), h("button", { type: "submit" }, "Use key"));
  const useKey = async () => {
    clearErrors();
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    await start().catch(report);
  };
  page.replaceChildren(h("h1", {}, "Sign in"),
    message ? h("p", { id: "login-message" }, message) : null,
    h("form", { class: "login", id: "login-form", onsubmit: async (event) => {
      event.preventDefault();
      if (!(await signIn("/api/v1/login", { name: name.value.trim(), password: password.value }))) password.value = "";
    } },
      h("label", {}, "User name", name), h("label", {}, "Password", password), h("button", { type: "submit" }, "Sign in")),
    h("p", {}, h("button", { type: "button", class: "secondary", onclick: () => { keyForm.hidden = false; key.focus(); } }, "Use an API key instead")),
    keyForm);
  name.focus();
}

// The first start with auth on: `appliance serve` printed a setup token; it makes the first admin.
function setupView() {
  const token = h("input", { id: "setup-token", autocomplete: "off", spellcheck: "false", size: 40, required: true });
  const name = h("input", { id: "setup-name", autocomplete: "username", required: true, placeholder: "admin" });
  const password = h("input", { id: "setup-password", type: "password", autocomplete: "new-password", required: true, placeholder: "10 characters or more" });
  const again = h("input", { id: "setup-again", type: "password", autocomplete: "new-password", required: true });
  const create = async () => {
    if (password.value !== again.value) return showError("the two passwords differ: type the same password twice");
    await signIn("/api/v1/setup", { token: token.value.trim(), name: name.value.trim(), password: password.value });
  };
  page.replaceChildren(h("h1", {}, "Create the first admin"),
    h("p", { class: "muted" }, "No admin exists yet. appliance serve printed a one-time setup token as it started (good until it stops); or make an admin with appliance users add NAME --role admin, then sign in."),
    h("form", { class: "login", id: "setup-form", onsubmit: (event) => { event.preventDefault(); create(); } },
      h("label", {}, "Setup token", token), h("label", {}, "Admin's user name", name),
      h("label", {}, "Password", password), h("label", {}, "Password again", again),
      h("button", { type: "submit" }, "Create the admin and sign in")),
    h("p", {}, h("button", { type: "button", class: "secondary", onclick: () => { clearErrors(); loginView(""); } }, "Sign in instead")));
  token.focus();
}

// -- routing -----------------------------------------------------------------------------------

// The MCP page lives in its own module; it gets the helpers it draws with.
function mcp() {
  const token = generation;
  return mcpPage({ h, api, page, me, report, current: () => token === generation });
}

const pages = { "": dashboard, models, chat, tasks, mcp, nodes, providers, audit, settings, keys, users };
const ADMIN_PAGES = new Set(["", "nodes", "providers", "audit", "settings", "users"]);

// Its link is hidden from them, and the server answers its calls with 403 anyway.
function adminOnly() {
  page.replaceChildren(h("h1", {}, "Admins only"),
    h("p", {}, `This page needs the admin role; you are signed in as ${me.name} (${me.role}).`));
}

// Stops what the current page runs (timers, event streams); their late answers are dropped.
function leavePage() {
  generation += 1;
  for (const stop of leaving) stop();
  leaving = [];
}

async function route() {
  if (me === null) return;  // the login page is up; it routes once someone signs in
  leavePage();
  clearErrors();
  const asked = location.hash.replace(/^#\/?/, "").split("?")[0];
  const name = Object.hasOwn(pages, asked) ? asked : "";
  const home = isAdmin() ? "" : "models";  // the dashboard shows the machine: admins only
  const shown = name === "" ? home : name;
  const draw = ADMIN_PAGES.has(shown) && !isAdmin() ? adminOnly : pages[shown];
  for (const link of nav.querySelectorAll("a")) {
    const current = link.dataset.page === (shown || "dashboard");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  await draw();
  page.focus({ preventScroll: true });
}

document.getElementById("logout").addEventListener("click", logOut);
window.addEventListener("hashchange", route);
start().catch(report);
