// The try-it page: lists the models, sends one image to POST /translate, shows the result next
// to the input with the server's timings, and turns every error body into a sentence.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "cycleserve.apiKey";
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };
const TIMING_STAGES = ["decode", "queue", "inference", "encode"];

const state = { file: null, inputUrl: null, resultUrl: null, request: 0 };

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text) {
  $("status").textContent = text;
}

// A failure: one sentence in words, then the server's own message, if any, in smaller print.
function showError(text, detail = "") {
  $("error-text").textContent = text;
  $("error-detail").textContent = detail;
  $("error").hidden = !text;
  $("retry").hidden = !text || !state.file;
}

// Reads `{"error": {"code", "message"}}` when the body has it; null otherwise.
async function errorBody(response) {
  try {
    const body = await response.json();
    return body && body.error ? body.error : null;
  } catch {
    return null;
  }
}

// A failed response in words: what happened and what to do next, and the server's message.
async function describeFailure(response) {
  const error = await errorBody(response);
  const code = error ? error.code : "";
  const detail = error && error.message ? `The server said: ${error.message}` : "";
  const words = (text) => [text, detail];
  if (response.status === 401) {
    return words("This server needs an API key: enter it in the API key field above.");
  }
  if (response.status === 403) {
    return words("The API key was refused: check it and try again.");
  }
  if (code === "too_many_bytes" || code === "too_many_pixels" || response.status === 413) {
    return words("The image is too large for this server. Try a smaller one.");
  }
  if (["unsupported_image", "unsupported_content_type", "empty_image"].includes(code) || response.status === 415) {
    return words("That file is not an image the server can read.");
  }
  if (code === "corrupt_image" || response.status === 422) {
    return words("The image is damaged or incomplete.");
  }
  if (response.status === 503) {
    const wait = response.headers.get("Retry-After");
    const when = wait ? `in ${wait} second${wait === "1" ? "" : "s"}` : "in a moment";
    const why = code === "overloaded" ? "The server is overloaded" : "The server is not available right now";
    return words(`${why}: try again ${when}.`);
  }
  if (code === "timed_out" || response.status === 504) {
    return words("The server took too long. Try a smaller image, or try again later.");
  }
  return words(`The request failed (HTTP ${response.status}).`);
}

async function loadModels() {
  const select = $("direction");
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch {
    select.options[0].textContent = "no models listed";
    showError("Cannot reach the server to list its models.");
    return;
  }
  if (!response.ok) {
    select.options[0].textContent = "no models listed";
    showError(...(await describeFailure(response)));
    return;
  }
  const { models } = await response.json();
  select.replaceChildren();
  for (const model of models) {
    const group = document.createElement("optgroup");
    group.label = model.name;
    for (const direction of model.directions) {
      const [from, to] = direction.direction === "x2y"
        ? [model.domains.x, model.domains.y]
        : [model.domains.y, model.domains.x];
      const option = new Option(`${direction.name} (${from} → ${to})`, `${model.name}/${direction.direction}`);
      option.dataset.name = direction.name;
      group.append(option);
    }
    select.append(group);
  }
  select.disabled = models.length === 0;
  if (models.length === 0) {
    showError("The server has no models loaded.");
    return;
  }
  showError("");
  const describe = () => {
    const model = models.find((m) => m.name === select.value.split("/")[0]);
    const a = model.architecture;
    $("model-info").textContent =
      `${model.name}: ${model.domains.x} ↔ ${model.domains.y}, ${a.family} generator, ${a.n_blocks} blocks, ` +
      `ngf ${a.ngf}, ${(model.parameters_per_generator / 1e6).toFixed(2)} M parameters, on ${model.device}`;
  };
  select.onchange = () => {
    describe();
    translate();
  };
  describe();
}

function setImages(ids, url) {
  for (const id of ids) {
    if (url) {
      $(id).src = url;
    } else {
      $(id).removeAttribute("src");
    }
  }
}

function chooseFile(file) {
  if (!file) {
    return;
  }
  if (state.inputUrl) {
    URL.revokeObjectURL(state.inputUrl);
  }
  state.file = file;
  state.inputUrl = URL.createObjectURL(file);
  setImages(["input-image", "wipe-input"], state.inputUrl);
  translate();
}

function clearResult() {
  if (state.resultUrl) {
    URL.revokeObjectURL(state.resultUrl);
    state.resultUrl = null;
  }
  setImages(["result-image", "wipe-result"], null);
  $("download").hidden = true;
  $("timings").replaceChildren();
}

async function translate() {
  if (!state.file || $("direction").disabled) {
    return;
  }
  const [model, direction] = $("direction").value.split("/");
  const format = $("format").value;
  const request = ++state.request;
  clearResult();
  showError("");
  $("compare").hidden = false;
  setStatus(`Translating ${state.file.name || "the pasted image"}…`);
  const query = new URLSearchParams({ direction, model });
  let response;
  try {
    response = await fetch(`/translate?${query}`, {
      method: "POST",
      // The server recognises the format from the bytes, so any file goes as it is.
      headers: { ...authHeaders(), "Content-Type": "application/octet-stream", Accept: format },
      body: state.file,
    });
  } catch {
    if (request === state.request) {
      setStatus("");
      $("compare").hidden = true;
      showError("Cannot reach the server. Is it still running?");
    }
    return;
  }
  if (request !== state.request) {
    return; // a newer image or setting replaced this one
  }
  if (!response.ok) {
    const [message, detail] = await describeFailure(response);
    if (request === state.request) {
      setStatus("");
      $("compare").hidden = true;
      showError(message, detail);
    }
    return;
  }
  const blob = await response.blob();
  if (request !== state.request) {
    return;
  }
  state.resultUrl = URL.createObjectURL(blob);
  setImages(["result-image", "wipe-result"], state.resultUrl);
  const name = $("direction").selectedOptions[0].dataset.name;
  const stem = (state.file.name || "image").replace(/\.[^.]*$/, "");
  const type = blob.type || format;
  const link = $("download");
  link.href = state.resultUrl;
  link.download = `${stem}-${name}.${EXTENSIONS[type] || "png"}`;
  link.textContent = `Download ${(EXTENSIONS[type] || "png").toUpperCase()}`;
  link.hidden = false;
  $("result-caption").textContent = `Result (${name})`;
  showTimings(response.headers);
  setStatus("Done.");
}

// `Server-Timing: decode;dur=1.2, queue;dur=0.3, …` and `X-Batch-Size` as a small table.
function showTimings(headers) {
  const durations = new Map();
  for (const part of (headers.get("Server-Timing") || "").split(",")) {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && dur) {
      durations.set(name, Number(dur.slice(4)));
    }
  }
  const rows = TIMING_STAGES.filter((s) => durations.has(s)).map((s) => [s, `${durations.get(s).toFixed(1)} ms`]);
  const batch = headers.get("X-Batch-Size");
  if (batch) {
    rows.push(["batch size", batch]);
  }
  const list = $("timings");
  list.replaceChildren();
  for (const [term, value] of rows) {
    const item = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    item.append(dt, dd);
    list.append(item);
  }
}

function setView(wipe) {
  $("side").hidden = wipe;
  $("wipe").hidden = !wipe;
  $("view-side").setAttribute("aria-pressed", String(!wipe));
  $("view-wipe").setAttribute("aria-pressed", String(wipe));
}

function setWipe() {
  const shown = Number($("wipe-position").value);
  $("wipe-result").style.clipPath = `inset(0 ${100 - shown}% 0 0)`;
}

function firstImageFile(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file) {
      return file;
    }
  }
  return null;
}

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    if (key.value.trim()) {
      sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    } else {
      sessionStorage.removeItem(KEY_STORAGE);
    }
    if ($("direction").disabled) {
      loadModels().then(translate);
    } else {
      translate();
    }
  });
  $("controls").addEventListener("submit", (event) => event.preventDefault());
  $("format").addEventListener("change", translate);
  $("retry").addEventListener("click", translate);
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));

  // The whole page takes a drop, so a near miss never navigates away to the file itself.
  const drop = $("drop");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) {
      drop.classList.remove("dragging");
    }
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    chooseFile(firstImageFile(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const file = firstImageFile(event.clipboardData && event.clipboardData.items);
    if (file) {
      event.preventDefault();
      chooseFile(file);
    }
  });

  // Input and result show at the input's own width (at least 16rem), never wider than a column.
  $("input-image").addEventListener("load", (event) => {
    const width = Math.max(event.target.naturalWidth, 256);
    $("compare").style.setProperty("--shown-width", `${width}px`);
  });
  $("view-side").addEventListener("click", () => setView(false));
  $("view-wipe").addEventListener("click", () => setView(true));
  $("wipe-position").addEventListener("input", setWipe);
  setWipe();
  loadModels();
}

init();
