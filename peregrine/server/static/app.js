// peregrine playground: a chat that streams from /v1/chat/completions and live server stats
// read from /metrics. Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), system: $("system"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
  maxTokensValue: $("max-tokens-value"), apiKey: $("api-key"), newChat: $("new-chat"),
  status: $("status"), statusDot: $("status-dot"), modelName: $("model-name"),
  modelPicker: $("model-picker"),
};

const history = [];          // [{role, content}] of this conversation (system prompt excluded)
let controller = null;       // AbortController of the answer being streamed
let modelName = null;

// --- settings, kept across reloads ----------------------------------------------------------
const SETTINGS = ["system", "temperature", "maxTokens", "apiKey"];
function loadSettings() {
  for (const key of SETTINGS) {
    const saved = localStorage.getItem("peregrine." + key);
    if (saved !== null) els[key].value = saved;
  }
  showSliders();
}
function saveSettings() {
  for (const key of SETTINGS) localStorage.setItem("peregrine." + key, els[key].value);
}
function showSliders() {
  els.temperatureValue.textContent = Number(els.temperature.value).toFixed(2);
  els.maxTokensValue.textContent = els.maxTokens.value;
}
for (const key of SETTINGS) {
  els[key].addEventListener("input", () => { showSliders(); saveSettings(); });
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.apiKey.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// --- transcript -----------------------------------------------------------------------------
function addMessage(role, text) {
  els.empty.hidden = true;
  const msg = document.createElement("div");
  msg.className = "msg " + role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  msg.appendChild(content);
  els.messages.appendChild(msg);
  scrollDown();
  return msg;
}
function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

function showMeta(msg, m) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const parts = [];
  if (m.ttftMs !== null) parts.push(["TTFT", `${Math.round(m.ttftMs)} ms`]);
  if (m.tps !== null) parts.push(["", `${m.tps.toFixed(1)} tok/s`]);
  if (m.tokens !== null) parts.push(["", `${m.tokens} tokens`]);
  if (m.finish) parts.push(["", m.finish]);
  for (const [label, value] of parts) {
    const span = document.createElement("span");
    if (label) span.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    span.appendChild(b);
    meta.appendChild(span);
  }
  msg.dataset.ttftMs = m.ttftMs === null ? "" : m.ttftMs.toFixed(1);
  msg.dataset.tps = m.tps === null ? "" : m.tps.toFixed(2);
  msg.dataset.tokens = m.tokens === null ? "" : String(m.tokens);
  msg.dataset.finish = m.finish || "";
  msg.appendChild(meta);
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.prompt.disabled = busy;
}

// --- streaming ------------------------------------------------------------------------------
// Server-sent events arrive as "data: {...}\n\n" blocks; one read may hold several or half of one.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

async function ask(question) {
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const content = msg.querySelector(".content");

  const messages = [];
  const system = els.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(els.temperature.value), max_tokens: Number(els.maxTokens.value),
  };
  if (modelName) body.model = modelName;

  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, tLast = null, text = "", usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          const now = performance.now();
          if (tFirst === null) tFirst = now;
          tLast = now;
          text += piece;
          content.textContent = text;
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      msg.classList.add("error");
      content.textContent = (text ? text + "\n\n" : "") + "Error: " + e.message;
    }
  } finally {
    controller = null;
    msg.classList.remove("streaming");
    setBusy(false);
    els.prompt.focus();
  }
  const tokens = usage ? usage.completion_tokens : null;
  const decodeS = tFirst !== null && tLast !== null ? (tLast - tFirst) / 1000 : 0;
  const tps = tokens && tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : null;
  showMeta(msg, { ttftMs: tFirst === null ? null : tFirst - t0, tps, tokens, finish });
  if (text) history.push({ role: "assistant", content: text });
  scrollDown();
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const question = els.prompt.value.trim();
  if (!question || controller) return;
  els.prompt.value = "";
  autosize();
  ask(question);
});
els.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.composer.requestSubmit();
  }
});
function autosize() {
  els.prompt.style.height = "auto";
  els.prompt.style.height = Math.min(els.prompt.scrollHeight + 2, 200) + "px";
}
els.prompt.addEventListener("input", autosize);
els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
els.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  for (const m of [...els.messages.querySelectorAll(".msg")]) m.remove();
  els.empty.hidden = false;
});

// --- live server stats from /metrics ---------------------------------------------------------
// Prometheus text format: `name{label="v",...} value`; values of a name are summed over labels,
// over the picked model's series only when the server serves several.
function parseMetrics(text) {
  const values = new Map();
  const labels = {};
  const picked = els.modelPicker.value;
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const model = m[2] && m[2].match(/model_name="([^"]*)"/);
    if (picked && model && model[1] !== picked) continue;
    values.set(m[1], (values.get(m[1]) || 0) + Number(m[3]));
    if (model) labels.model = model[1];
  }
  return { values, labels };
}

// --- the model picker, filled from /v1/models (generation models only) ------------------------
async function loadModels() {
  const headers = els.apiKey.value ? { Authorization: "Bearer " + els.apiKey.value } : {};
  let data;
  try {
    const response = await fetch("/v1/models", { headers });
    if (!response.ok) return;
    data = (await response.json()).data.filter((m) => m.task !== "embed");
  } catch (e) {
    return;
  }
  const picker = els.modelPicker;
  const keep = picker.value || localStorage.getItem("peregrine.model");
  picker.replaceChildren(...data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.state && m.state !== "loaded" ? `${m.id} (${m.state})` : m.id;
    return option;
  }));
  if (data.some((m) => m.id === keep)) picker.value = keep;
  picker.disabled = data.length < 2;
  pickModel();
}
function pickModel() {
  if (!els.modelPicker.value) return;
  modelName = els.modelPicker.value;
  els.modelName.textContent = modelName;
  localStorage.setItem("peregrine.model", modelName);
}
els.modelPicker.addEventListener("change", () => { pickModel(); lastGen = null; });
els.apiKey.addEventListener("change", loadModels);

const fmt = new Intl.NumberFormat("en-US");
let lastGen = null;
function showStats({ values, labels }, dt) {
  const get = (name) => values.get("peregrine:" + name);
  const set = (id, v) => { $(id).textContent = v === undefined ? "–" : v; };
  set("stat-running", get("num_requests_running"));
  set("stat-waiting", get("num_requests_waiting"));
  const kv = get("kv_cache_usage");
  set("stat-kv", kv === undefined ? undefined : (100 * kv).toFixed(1) + " %");
  $("stat-kv-bar").style.width = kv === undefined ? "0" : (100 * kv).toFixed(1) + "%";
  const gen = get("generation_tokens_total");
  set("stat-gen-tokens", gen === undefined ? undefined : fmt.format(gen));
  const prompt = get("prompt_tokens_total");
  set("stat-prompt-tokens", prompt === undefined ? undefined : fmt.format(prompt));
  if (gen !== undefined && lastGen !== null && dt > 0) {
    set("stat-throughput", ((gen - lastGen) / dt).toFixed(1) + " tok/s");
  }
  lastGen = gen === undefined ? null : gen;
  const hit = get("prefix_cache_hit_rate");
  set("stat-prefix", hit === undefined ? undefined : (100 * hit).toFixed(1) + " %");
  const done = get("request_success_total");
  set("stat-requests", done === undefined ? 0 : fmt.format(done));
  set("stat-preemptions", get("num_preemptions_total"));
  if (labels.model && labels.model !== modelName) {
    modelName = labels.model;
    els.modelName.textContent = modelName;
  }
}

function setStatus(kind, text) {
  els.statusDot.className = "dot " + kind;
  els.status.textContent = text;
}

let lastPoll = null;
let polls = 0;
async function poll() {
  if (polls++ % 5 === 0) loadModels();  // states change as models load and unload
  try {
    const health = await fetch("/health");
    setStatus(health.ok ? "ready" : "loading", health.ok ? "ready" : "loading model…");
    const response = await fetch("/metrics");
    if (response.ok) {
      const now = performance.now();
      showStats(parseMetrics(await response.text()), lastPoll === null ? 0 : (now - lastPoll) / 1000);
      lastPoll = now;
      $("stats-age").textContent = "live";
    }
  } catch (e) {
    setStatus("down", "server unreachable");
    $("stats-age").textContent = "";
  }
}

loadSettings();
autosize();
poll();
setInterval(poll, 1000);
els.prompt.focus();
