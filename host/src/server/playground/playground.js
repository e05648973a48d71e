// The playground: submit a job with an API key, follow it live (Server-Sent Events opened with
// a short-lived events token, never the key in a URL), play the video, cancel, recent jobs.
"use strict";

const $ = (id) => document.getElementById(id);
// The seed's model, until GET /models (with the key) lists what this server serves.
const DEFAULT_MODEL = "Wan2.1-T2V-1.3B";
const RECENT_KEY = "wanserve.recent";
const STAGES = { encoding_text: "Encoding the prompt", denoising: "Denoising", decoding: "Decoding" };
let following = null; // { id, source }

const apiKey = () => $("api-key").value.trim();

async function call(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { Authorization: "Bearer " + apiKey(), "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  return { status: response.status, data };
}

function clearErrors() {
  document.querySelectorAll("[data-error-for]").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  $("form-error").textContent = "";
}

function fieldError(field, reason) {
  const slot = document.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
  if (!slot) {
    $("form-error").textContent += `${field}: ${reason}. `;
    return;
  }
  slot.textContent = reason;
  const input = slot.parentElement.querySelector("input, textarea, select");
  if (input) input.setAttribute("aria-invalid", "true");
}

// The same ranges as the server's (the inputs carry them); the server's answer is final.
function checkLocally() {
  let ok = true;
  if (!apiKey()) { fieldError("api_key", "Paste an API key."); ok = false; }
  const prompt = $("prompt").value.trim();
  const chars = [...prompt].length;
  if (chars < 10 || chars > 500) {
    fieldError("prompt", `must be 10 to 500 characters (now ${chars})`);
    ok = false;
  }
  for (const id of ["num_frames", "guidance_scale", "infer_steps", "seed"]) {
    const input = $(id);
    if (!input.checkValidity()) { fieldError(id, input.validationMessage); ok = false; }
  }
  return ok;
}

// "· step cache fast: 26 of 100 passes skipped", or nothing when the job runs every step.
function cacheNote(s) {
  const c = s.cache;
  if (!c || c.mode === "off") return "";
  return ` · step cache ${c.mode}: ${c.skippedPasses} of ${c.passes} passes skipped`;
}

function requestBody() {
  const body = {
    model: $("model").value || DEFAULT_MODEL,
    prompt: $("prompt").value.trim(),
    image_size: $("image_size").value,
    num_frames: Number($("num_frames").value),
    guidance_scale: Number($("guidance_scale").value),
    infer_steps: Number($("infer_steps").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("cache").value !== "") body.cache = $("cache").value;
  if ($("negative_prompt").value.trim() !== "") body.negative_prompt = $("negative_prompt").value.trim();
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (!checkLocally()) return;
  const button = $("submit");
  button.disabled = true;
  try {
    const body = requestBody();
    const { status, data } = await call("/video/submit", body);
    if (status === 202 && data && data.requestId) {
      remember(data.requestId, body.prompt);
      follow(data.requestId);
      return;
    }
    const error = (data && data.error) || {};
    for (const f of error.fields || []) fieldError(f.field, f.reason);
    if (status === 401) fieldError("api_key", error.message || "The key was refused.");
    else if (!(error.fields || []).length) {
      $("form-error").textContent = error.message || `The server answered ${status}.`;
    }
  } catch (e) {
    $("form-error").textContent = "Cannot reach the server: " + e.message;
  } finally {
    button.disabled = false;
  }
}

function stopFollowing() {
  if (following && following.source) following.source.close();
  following = null;
}

async function follow(id) {
  stopFollowing();
  following = { id, source: null };
  const mine = following;
  $("job").hidden = false;
  $("job-title").textContent = id;
  $("job-state").textContent = "Connecting…";
  $("job-state").className = "state";
  $("job-detail").textContent = "";
  $("progress").value = 0;
  const video = $("video");
  video.hidden = true;
  video.removeAttribute("src");
  const preview = $("preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  delete preview.dataset.step;
  // The token opens this job's stream for a few minutes; a dropped stream gets a new one.
  const open = async () => {
    if (following !== mine) return;
    const { status, data } = await call("/video/events-token", { requestId: id });
    if (status !== 200 || !data) {
      $("job-state").textContent = (data && data.error && data.error.message) || `Cannot follow the job (${status}).`;
      $("job-state").className = "state bad";
      return;
    }
    const source = new EventSource(`/video/events/${encodeURIComponent(id)}?token=${encodeURIComponent(data.token)}`);
    mine.source = source;
    source.addEventListener("status", (e) => render(JSON.parse(e.data), source));
    source.addEventListener("preview", (e) => showPreview(JSON.parse(e.data)));
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED || source.finalSeen) return;
      source.close();
      setTimeout(open, 1000);
    };
  };
  await open();
}

// A running job's latest preview: a small picture of the denoiser's estimate so far.
function showPreview(p) {
  if (!following || p.requestId !== following.id) return;
  const preview = $("preview");
  preview.src = p.image;
  preview.dataset.step = String(p.step);
  preview.title = `after step ${p.step} of ${p.total}`;
  preview.hidden = false;
}

function render(s, source) {
  const state = $("job-state");
  const progress = $("progress");
  const detail = $("job-detail");
  const final = ["Succeed", "Failed", "Cancelled"].includes(s.status);
  $("cancel").hidden = final;
  progress.dataset.status = s.status;
  if (s.status === "InQueue") {
    state.textContent = s.position ? `Queued — position ${s.position}` : "Queued";
    progress.removeAttribute("value");
    detail.textContent = "";
  } else if (s.status === "InProgress") {
    const p = s.progress || { stage: "encoding_text", step: 0, total: 1 };
    state.textContent = STAGES[p.stage] || p.stage;
    progress.max = Math.max(p.total, 1);
    progress.value = p.step;
    progress.dataset.stage = p.stage;
    progress.dataset.step = String(p.step);
    const eta = s.etaSeconds != null ? ` · about ${Math.ceil(s.etaSeconds)} s left` : "";
    detail.textContent = `${p.stage === "decoding" ? "chunk" : "step"} ${p.step} of ${p.total}${eta}${cacheNote(s)}`;
  } else if (s.status === "Succeed") {
    state.textContent = "Done";
    state.className = "state ok";
    progress.max = 1;
    progress.value = 1;
    const seconds = s.results && s.results.timings && s.results.timings.inference;
    detail.textContent = `seed ${s.seed}` + (seconds != null ? ` · generated in ${seconds.toFixed(1)} s` : "") + cacheNote(s);
    const url = s.results && s.results.videos && s.results.videos[0] && s.results.videos[0].url;
    if (url) {
      $("preview").hidden = true;
      const video = $("video");
      video.src = url;
      video.hidden = false;
      video.play().catch(() => { /* autoplay refused: the controls remain */ });
    } else if (s.expired) {
      detail.textContent += " · the video has expired";
    }
  } else {
    state.textContent = s.status === "Cancelled" ? "Cancelled" : "Failed";
    state.className = "state bad";
    detail.textContent = s.reason || "";
  }
  updateRecent(s.requestId, s.status);
  if (final) {
    source.finalSeen = true;
    source.close();
  }
}

async function cancel() {
  if (!following) return;
  const { status, data } = await call("/video/cancel", { requestId: following.id });
  if (status !== 200) {
    $("job-detail").textContent = (data && data.error && data.error.message) || `Cancel failed (${status}).`;
  }
}

function recent() {
  try { return JSON.parse(localStorage.getItem(RECENT_KEY)) || []; } catch (_) { return []; }
}

function remember(id, prompt) {
  const list = [{ id, prompt, at: Date.now() }, ...recent().filter((j) => j.id !== id)].slice(0, 20);
  localStorage.setItem(RECENT_KEY, JSON.stringify(list));
  showRecent();
}

function updateRecent(id, status) {
  const badge = document.querySelector(`#recent-list [data-id="${CSS.escape(id)}"] .badge`);
  if (badge) badge.textContent = status;
}

function showRecent() {
  const list = $("recent-list");
  list.replaceChildren();
  const jobs = recent();
  if (!jobs.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "None yet.";
    list.append(li);
    return;
  }
  for (const job of jobs) {
    const li = document.createElement("li");
    li.dataset.id = job.id;
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = job.prompt;
    prompt.title = job.id;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "…";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "secondary";
    open.textContent = "Open";
    open.addEventListener("click", () => follow(job.id));
    li.append(prompt, badge, open);
    list.append(li);
    if (apiKey()) {
      call("/video/status", { requestId: job.id })
        .then(({ status, data }) => { badge.textContent = status === 200 ? data.status : status === 404 ? "gone" : "?"; })
        .catch(() => { badge.textContent = "?"; });
    }
  }
}

function countPrompt() {
  $("prompt-count").textContent = `${[...$("prompt").value.trim()].length} / 500`;
}

// The models this server serves (GET /models needs the key): one option each; a few-step
// distilled model fixes the step count and has no step cache.
let models = [];
async function loadModels() {
  if (!apiKey()) return;
  let response;
  try {
    response = await fetch("/models", { headers: { Authorization: "Bearer " + apiKey() } });
  } catch (_) { return; }
  if (!response.ok) return;
  const listed = (await response.json()).models || [];
  if (listed.length === 0) return;
  models = listed;
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...listed.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.steps ? `${m.name} (${m.steps} steps, distilled)` : m.name;
    return option;
  }));
  if (listed.some((m) => m.name === chosen)) select.value = chosen;
  select.dataset.listed = listed.map((m) => m.name).join(",");
  modelChosen();
}

function modelChosen() {
  const model = models.find((m) => m.name === $("model").value);
  const steps = $("infer_steps");
  if (model && model.steps) {
    steps.min = steps.max = steps.value = String(model.steps);
  } else {
    steps.min = "20";
    steps.max = "100";
    if (Number(steps.value) < 20) steps.value = "50";
  }
  const cache = $("cache");
  for (const option of cache.options) {
    option.disabled = option.value !== "" && option.value !== "off" && model !== undefined &&
      !(model.cacheModes || []).includes(option.value);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("wanserve.key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("wanserve.key", apiKey());
    showRecent();
    loadModels();
  });
  $("model").addEventListener("change", modelChosen);
  loadModels();
  $("prompt").addEventListener("input", countPrompt);
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  countPrompt();
  showRecent();
});
