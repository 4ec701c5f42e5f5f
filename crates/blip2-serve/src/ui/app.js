// The playground page: drives this server's own API (/v1/...) from the browser.
// No framework and nothing loaded from elsewhere; the server compiles this file in.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  config: null,
  file: null,
  dataUrl: null,
  // Chat turns so far: [question, answer] pairs about the current image.
  turns: [],
  busy: false,
};

const PROMPTS = {
  caption: null,
  prompted: { label: "Text to continue", placeholder: "a photo of" },
  vqa: { label: "Question", placeholder: "what is in the picture?" },
  chat: { label: "Your question", placeholder: "what is in the picture?" },
};

function showError(message) {
  const e = $("error");
  e.textContent = message;
  e.hidden = !message;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// The API's error object in words: OpenAI's {"error": {"message", "param"}} shape.
function apiMessage(status, body) {
  let text = "";
  try {
    const e = JSON.parse(body).error;
    text = e.message + (e.param ? " (parameter: " + e.param + ")" : "");
  } catch (_) {
    text = body.trim() || "no details";
  }
  const what = {
    400: "The server could not use this request",
    401: "The server needs its API key: enter it above",
    404: "Not found",
    413: "The image is too large for this server",
    503: "The server is busy (its queue is full): try again in a moment",
  }[status] || "The server answered " + status;
  return what + ": " + text;
}

async function post(path, body) {
  let r;
  try {
    r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (e) {
    throw new Error("Cannot reach the server (" + e.message + "); is blip2-ort serve still running?");
  }
  if (!r.ok) throw new Error(apiMessage(r.status, await r.text()));
  return r;
}

function finish() {
  state.busy = false;
  $("run").disabled = false;
  $("search-run").disabled = false;
  document.body.dataset.done = String(Number(document.body.dataset.done) + 1);
}

// ---- the image: picked, dropped or pasted ----

function setImage(file) {
  if (!file) return;
  state.file = file;
  state.dataUrl = null;
  state.turns = [];
  renderChat();
  showError("");
  $("image-name").textContent = file.name ? "Image: " + file.name : "Image: pasted";
  const reader = new FileReader();
  reader.onload = () => {
    state.dataUrl = reader.result;
    const img = $("preview");
    img.alt = "The chosen image" + (file.name ? ", " + file.name : "");
    img.src = reader.result;
    img.hidden = false;
  };
  reader.onerror = () => {
    state.file = null;
    showError("Cannot read the file: " + (reader.error && reader.error.message));
  };
  reader.readAsDataURL(file);
}

function readyImage() {
  return new Promise((resolve, reject) => {
    if (!state.file) return reject(new Error("Choose an image first."));
    const wait = () => {
      if (state.dataUrl) resolve(state.dataUrl);
      else if (!state.file) reject(new Error("The image could not be read: choose it again."));
      else setTimeout(wait, 20);
    };
    wait();
  });
}

function wireImage() {
  $("image").addEventListener("change", (e) => setImage(e.target.files[0]));
  $("preview").addEventListener("error", () => {
    $("preview").hidden = true;
    $("image-name").textContent += " (this browser cannot show it; the server decides whether it can read it)";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.kind === "file");
    if (item) {
      e.preventDefault();
      setImage(item.getAsFile());
    }
  });
}

// ---- captioning exports ----

function onTask() {
  const task = $("task").value;
  const p = PROMPTS[task];
  $("prompt-row").hidden = !p;
  if (p) {
    $("prompt-label").textContent = p.label;
    $("prompt").placeholder = p.placeholder;
  }
  $("reset").hidden = task !== "chat";
  $("chat-log").hidden = task !== "chat" || state.turns.length === 0;
}

function renderChat() {
  const log = $("chat-log");
  log.replaceChildren();
  for (const [q, a] of state.turns) {
    const li = document.createElement("li");
    const qe = document.createElement("p");
    qe.className = "q";
    qe.textContent = q;
    const ae = document.createElement("p");
    ae.className = "a";
    ae.textContent = a || "(no text)";
    li.append(qe, ae);
    log.append(li);
  }
  log.hidden = $("task").value !== "chat" || state.turns.length === 0;
}

function whole(id, name, min) {
  const v = $(id).value.trim();
  if (v === "") return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new Error(name + " must be a whole number of at least " + min + ".");
  return n;
}

function settings() {
  const s = {};
  const max = whole("max-tokens", "Max new tokens", 1);
  if (max !== undefined) s.max_tokens = max;
  const beams = whole("beams", "Beams", 1);
  if (beams !== undefined) s.num_beams = beams;
  if ($("sample").checked) {
    const t = Number($("temperature").value);
    if (!(t > 0)) throw new Error("Temperature must be above 0 to sample.");
    s.temperature = t;
    const seed = whole("seed", "Seed", 0);
    if (seed !== undefined) s.seed = seed;
  }
  return s;
}

// Reads OpenAI's server-sent events, calling onData with each parsed chunk.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error("The server failed while answering: " + chunk.error.message);
      onData(chunk);
    }
  }
}

async function runCaptioning() {
  const task = $("task").value;
  const prompt = $("prompt").value.trim();
  if ((task === "vqa" || task === "chat") && !prompt) throw new Error("Type a question first.");
  const image = await readyImage();
  const body = Object.assign(settings(), { stream: true, stream_options: { include_usage: true } });
  let path;
  if (task === "caption" || task === "prompted") {
    path = "/v1/completions";
    body.prompt = task === "caption" ? "" : $("prompt").value;
    body.image = { url: image };
  } else {
    path = "/v1/chat/completions";
    const earlier = task === "chat" ? state.turns : [];
    const messages = [];
    earlier.forEach(([q, a], i) => {
      const content = [{ type: "text", text: q }];
      if (i === 0) content.unshift({ type: "image_url", image_url: { url: image } });
      messages.push({ role: "user", content }, { role: "assistant", content: a });
    });
    const last = [{ type: "text", text: prompt }];
    if (earlier.length === 0) last.unshift({ type: "image_url", image_url: { url: image } });
    messages.push({ role: "user", content: last });
    body.messages = messages;
  }
  const answer = $("answer");
  answer.textContent = "";
  answer.setAttribute("aria-busy", "true");
  $("stats").textContent = "Waiting for the first token…";
  const started = performance.now();
  let first = null;
  let tokens = null;
  try {
    const r = await post(path, body);
    await readEvents(r, (chunk) => {
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const c = chunk.choices && chunk.choices[0];
      if (!c || c.index !== 0) return;
      const text = c.delta ? c.delta.content : c.text;
      if (text) {
        if (first === null) first = performance.now();
        answer.textContent += text;
      }
    });
  } finally {
    answer.setAttribute("aria-busy", "false");
  }
  const total = performance.now() - started;
  const parts = [];
  parts.push(first === null ? "no text came (the tokens decode to nothing)" : "first token after " + Math.round(first - started) + " ms");
  if (tokens !== null) {
    parts.push(tokens + " tokens in " + Math.round(total) + " ms");
    parts.push((tokens / (total / 1000)).toFixed(1) + " tokens/s");
  }
  $("stats").textContent = parts.join(" · ");
  if (task === "chat") {
    state.turns.push([prompt, answer.textContent]);
    renderChat();
    $("prompt").value = "";
  }
}

// ---- retrieval exports ----

function bar(label, value, lo, hi) {
  const row = document.createElement("div");
  row.className = "bar";
  const name = document.createElement("span");
  name.textContent = label;
  const track = document.createElement("span");
  track.className = "track";
  track.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = Math.max(0, Math.min(1, (value - lo) / (hi - lo))) * 100 + "%";
  track.append(fill);
  const num = document.createElement("span");
  num.className = "num";
  num.textContent = value.toFixed(4);
  row.append(name, track, num);
  return row;
}

async function runRetrieval() {
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  if (!texts.length) throw new Error("Write at least one text to match with the image.");
  const image = await readyImage();
  const r = await post("/v1/score", { text_1: texts, text_2: texts.map(() => image) });
  const data = (await r.json()).data;
  const list = $("scores");
  list.replaceChildren();
  data.forEach((d) => {
    const li = document.createElement("li");
    li.dataset.text = texts[d.index];
    li.dataset.itm = String(d.score);
    li.dataset.itc = String(d.itc_score);
    const t = document.createElement("p");
    t.className = "text";
    t.textContent = texts[d.index];
    li.append(t, bar("ITM", d.score, 0, 1), bar("ITC", d.itc_score, -1, 1));
    list.append(li);
  });
}

async function runSearch() {
  const query = $("query").value.trim();
  if (!query) throw new Error("Describe what to find first.");
  const r = await post("/v1/search", { query, top_n: 12, thumbnails: 256 });
  const results = (await r.json()).results;
  const grid = $("results");
  grid.replaceChildren();
  if (!results.length) {
    const li = document.createElement("li");
    li.textContent = "The index holds no images.";
    grid.append(li);
  }
  for (const h of results) {
    const li = document.createElement("li");
    li.dataset.image = h.image;
    li.dataset.itc = String(h.itc);
    const fig = document.createElement("figure");
    const name = h.image.split(/[\\/]/).pop();
    if (h.thumbnail) {
      const img = document.createElement("img");
      img.src = h.thumbnail;
      img.alt = name;
      fig.append(img);
    }
    const cap = document.createElement("figcaption");
    cap.textContent = "#" + h.rank + " " + name + " · ITC " + h.itc.toFixed(4) + (h.itm !== undefined ? " · ITM " + h.itm.toFixed(4) : "");
    if (h.error) cap.textContent += " · " + h.error;
    cap.title = h.image;
    fig.append(cap);
    li.append(fig);
    grid.append(li);
  }
}

// ---- wiring ----

function guard(fn) {
  return async (e) => {
    e.preventDefault();
    if (state.busy) return;
    state.busy = true;
    $("run").disabled = true;
    $("search-run").disabled = true;
    showError("");
    try {
      await fn();
    } catch (err) {
      showError(err.message);
    } finally {
      finish();
    }
  };
}

async function start() {
  wireImage();
  let config;
  try {
    const r = await fetch("/ui/config");
    config = await r.json();
  } catch (e) {
    $("kind").textContent = "";
    showError("Cannot reach the server: " + e.message);
    return;
  }
  state.config = config;
  $("key-section").hidden = !config.api_key_required;
  if (config.kind === "captioning") {
    $("kind").textContent = "A captioning export: captions, questions and chat about an image.";
    $("captioning").hidden = false;
    $("output-captioning").hidden = false;
    $("task").addEventListener("change", onTask);
    $("reset").addEventListener("click", () => {
      state.turns = [];
      renderChat();
      $("answer").textContent = "";
      $("stats").textContent = "";
      $("prompt").focus();
    });
    $("form").addEventListener("submit", guard(runCaptioning));
    onTask();
  } else {
    $("kind").textContent = "An image-text retrieval export: how well texts match an image" + (config.search ? ", and search over its index." : ".");
    $("retrieval").hidden = false;
    $("output-retrieval").hidden = false;
    $("run").textContent = "Score";
    $("form").addEventListener("submit", guard(runRetrieval));
    if (config.search) {
      $("search-section").hidden = false;
      $("search-form").addEventListener("submit", guard(runSearch));
    }
  }
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
