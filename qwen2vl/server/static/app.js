// The chat page's controller: settings, the API key, conversations (store.js), attachments (attach.js), the
// streamed answer (api.js) and the keyboard. Rendering of one message is view.js's.

import { Api, ApiError } from "./api.js";
import { Store, loadSettings, saveSettings, apiKey, setApiKey } from "./store.js";
import { readAttachment, checkRequest, thumbnail, formatBytes } from "./attach.js";
import { messageView } from "./view.js";
import { plainText } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const FIELDS = ["system", "temperature", "top_p", "max_tokens", "max_pixels", "seed", "tools"];
const state = { config: { api_key_required: false, limits: {} }, model: "", convs: [], conv: null, pending: [],
                ctrl: null, settings: loadSettings(), deleted: new Set() };
const store = new Store();
const api = new Api(apiKey);

function newConv() {
  return { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "", messages: [],
           updated: Date.now() };
}

// ------------------------------------------------------------------ the API key
function askKey(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("key-input").value = "";
  return new Promise((resolve) => {
    const done = (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      setApiKey(key);
      $("key-form").removeEventListener("submit", done);
      dialog.close();
      resolve();
    };
    $("key-form").addEventListener("submit", done);
    dialog.showModal();
  });
}

async function loadModels() {
  for (;;) {
    try {
      const models = await api.models();
      state.model = models.length ? models[0].id : "";
      $("model-name").textContent = state.model;
      return;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401 && state.config.api_key_required) {
        setApiKey("");
        await askKey(e.message);
        continue;
      }
      $("model-name").textContent = "(models: " + e.message + ")";
      return;
    }
  }
}

// ------------------------------------------------------------------ settings
function initSettings() {
  for (const k of FIELDS) {
    const input = $("set-" + k);
    input.value = state.settings[k] ?? "";
    input.addEventListener("input", () => { state.settings[k] = input.value; saveSettings(state.settings); });
  }
  $("toggle-settings").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("forget-key").addEventListener("click", async () => { setApiKey(""); await askKey(""); await loadModels(); });
}

// The request's options from the settings; throws an Error for tools that are not OpenAI tool JSON.
function options() {
  const s = state.settings, out = {};
  for (const k of ["temperature", "top_p", "max_tokens", "seed"]) {
    if (s[k] !== undefined && String(s[k]).trim() !== "") out[k] = Number(s[k]);
  }
  if (s.max_pixels && String(s.max_pixels).trim()) out.mm_processor_kwargs = { max_pixels: Number(s.max_pixels) };
  if (s.tools && s.tools.trim()) {
    let tools;
    try {
      tools = JSON.parse(s.tools);
    } catch (e) {
      throw new Error("The tools box does not hold JSON: " + e.message);
    }
    out.tools = Array.isArray(tools) ? tools : [tools];
  }
  return out;
}

function requestMessages(messages) {
  const out = [];
  if (state.settings.system && state.settings.system.trim()) out.push({ role: "system", content: state.settings.system });
  for (const m of messages) {
    if (m.role === "user") {
      const content = (m.attachments || []).map((a) => (a.kind === "image"
        ? { type: "image_url", image_url: { url: a.url } } : { type: "video_url", video_url: { url: a.url } }));
      if (m.text) content.push({ type: "text", text: m.text });
      out.push({ role: "user", content });
    } else if (m.role === "tool") {
      out.push({ role: "tool", tool_call_id: m.callId, content: m.text });
    } else if (m.text || (m.toolCalls && m.toolCalls.length)) {
      const a = { role: "assistant", content: m.text };
      if (m.toolCalls && m.toolCalls.length) a.tool_calls = m.toolCalls;
      out.push(a);
    }
  }
  return out;
}

// ------------------------------------------------------------------ rendering
function refImage(messages, before) {
  for (let i = before - 1; i >= 0; i--) {
    const imgs = (messages[i].attachments || []).filter((a) => a.kind === "image");
    if (imgs.length) return imgs[imgs.length - 1];
  }
  return null;
}

function view(conv, i) {
  const msg = conv.messages[i];
  const last = i === conv.messages.length - 1;
  const answered = new Set(conv.messages.filter((m) => m.role === "tool").map((m) => m.callId));
  return messageView(msg, {
    streaming: last && state.ctrl !== null && msg.role === "assistant", isLast: last, answered,
    refImage: refImage(conv.messages, i),
    onCopy: (e) => copy(plainText(msg.text), e.target),
    onRegenerate: () => regenerate(),
    onToolResult: (call, value) => toolResult(call, value),
  });
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...state.conv.messages.map((m, i) => view(state.conv, i)));
  if (!state.conv.messages.length) {
    const hint = box.appendChild(document.createElement("p"));
    hint.className = "empty";
    hint.textContent = "Ask about a picture or a video: drop files here, paste a screenshot, or use Attach.";
  }
  box.scrollTop = box.scrollHeight;
}

function updateLast(conv) {
  if (conv !== state.conv) return;
  const box = $("messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  box.lastElementChild.replaceWith(view(conv, conv.messages.length - 1));
  if (near) box.scrollTop = box.scrollHeight;
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren(...state.convs.map((c) => {
    const li = document.createElement("li");
    const open = li.appendChild(document.createElement("button"));
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "(untitled)";
    if (state.conv && c.id === state.conv.id) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => openConv(c));
    const del = li.appendChild(document.createElement("button"));
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete conversation ${c.title || "(untitled)"}`);
    del.addEventListener("click", () => deleteConv(c));
    return li;
  }));
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function copy(text, button) {
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else fallbackCopy(text, done);
}

function fallbackCopy(text, done) {
  const t = document.createElement("textarea");
  t.value = text;
  t.setAttribute("aria-hidden", "true");
  t.className = "offscreen";
  document.body.append(t);
  t.select();
  document.execCommand("copy");
  t.remove();
  done();
}

// ------------------------------------------------------------------ conversations
async function refreshList() {
  state.convs = await store.list();
  renderList();
}

function openConv(c) {
  if (state.ctrl) state.ctrl.abort();
  state.conv = c;
  renderMessages();
  renderList();
  setSidebar(false);
}

async function deleteConv(c) {
  if (state.conv && state.conv.id === c.id) {
    if (state.ctrl) state.ctrl.abort();
    state.conv = newConv();
    renderMessages();
  }
  state.deleted.add(c.id);  // an answer still ending does not save it again
  await store.remove(c.id);
  await refreshList();
}

function newChat() {
  if (state.ctrl) state.ctrl.abort();
  state.conv = newConv();
  state.pending = [];
  renderAttachments();
  renderMessages();
  renderList();
  setSidebar(false);
  $("prompt").focus();
}

// ------------------------------------------------------------------ attachments
function historyAttachments() {
  return state.conv.messages.flatMap((m) => m.attachments || []);
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.pending.map((a, i) => thumbnail(a, () => {
    state.pending.splice(i, 1);
    renderAttachments();
  })));
}

async function addFiles(files) {
  const errors = [];
  for (const f of files) {
    try {
      const att = await readAttachment(f, state.config.limits);
      const problem = checkRequest(historyAttachments(), state.pending.concat([att]), state.config.limits);
      if (problem) throw new Error(`"${att.name}" not added: ${problem}`);
      state.pending.push(att);
    } catch (e) {
      errors.push(e.message);
    }
  }
  $("attach-error").textContent = errors.join("\n");
  renderAttachments();
}

// ------------------------------------------------------------------ sending
function mergeToolCall(msg, t) {
  const cur = msg.toolCalls[t.index ?? msg.toolCalls.length] ??= { id: "", type: "function",
                                                                   function: { name: "", arguments: "" } };
  if (t.id) cur.id = t.id;
  if (t.function && t.function.name) cur.function.name += t.function.name;
  if (t.function && t.function.arguments) cur.function.arguments += t.function.arguments;
}

function finishStats(msg, t0, first, end) {
  if (first === null) return;
  msg.ttft = (first - t0) / 1000;
  const n = msg.usage ? msg.usage.completion_tokens : msg.deltas;
  if (n > 1 && end > first) msg.tps = (n - 1) / ((end - first) / 1000);
}

function showSettingsError(message) {
  $("settings-error").textContent = message;
  $("settings").hidden = false;
  $("toggle-settings").setAttribute("aria-expanded", "true");
}

async function generate() {
  const conv = state.conv;
  let body;
  try {
    body = { messages: requestMessages(conv.messages), stream: true, stream_options: { include_usage: true },
             ...options() };
  } catch (e) {
    showSettingsError(e.message);
    return;
  }
  if (state.model) body.model = state.model;
  const msg = { role: "assistant", text: "", toolCalls: [], deltas: 0 };
  conv.messages.push(msg);
  state.ctrl = new AbortController();
  setBusy(true);
  renderMessages();
  const t0 = performance.now();
  let first = null;
  try {
    for await (const chunk of api.chat(body, state.ctrl.signal)) {
      if (chunk.usage) msg.usage = chunk.usage;
      for (const c of chunk.choices || []) {
        const d = c.delta || {};
        if (d.content || d.tool_calls) first ??= performance.now();
        if (d.content) { msg.text += d.content; msg.deltas++; }
        for (const t of d.tool_calls || []) mergeToolCall(msg, t);
        if (c.finish_reason) msg.finish = c.finish_reason;
      }
      updateLast(conv);
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else msg.error = e.message;
    if (e instanceof ApiError && e.status === 401) setApiKey("");
  }
  finishStats(msg, t0, first, performance.now());
  state.ctrl = null;
  setBusy(false);
  if (conv === state.conv) renderMessages();
  if (!state.deleted.has(conv.id)) await store.save(conv);
  await refreshList();
  if (msg.error && !apiKey() && state.config.api_key_required) await askKey(msg.error);
}

async function send() {
  if (state.ctrl) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  const problem = checkRequest(historyAttachments(), state.pending, state.config.limits);
  if (problem) {
    $("attach-error").textContent = problem;
    return;
  }
  try {
    options();  // the settings are checked before the message is taken
  } catch (e) {
    showSettingsError(e.message);
    return;
  }
  $("settings-error").textContent = "";
  const conv = state.conv;
  conv.messages.push({ role: "user", text, attachments: state.pending });
  if (!conv.title) conv.title = (text || state.pending[0].name).slice(0, 60);
  state.pending = [];
  $("prompt").value = "";
  $("attach-error").textContent = "";
  renderAttachments();
  await store.save(conv);
  await generate();
}

function regenerate() {
  const msgs = state.conv.messages;
  if (state.ctrl || !msgs.length || msgs[msgs.length - 1].role !== "assistant") return;
  msgs.pop();
  generate();
}

function toolResult(call, value) {
  if (state.ctrl) return;
  const conv = state.conv;
  conv.messages.push({ role: "tool", callId: call.id, name: call.function.name, text: value });
  const last = conv.messages.filter((m) => m.role === "assistant").pop();
  const answered = new Set(conv.messages.filter((m) => m.role === "tool").map((m) => m.callId));
  if (last.toolCalls.every((c) => answered.has(c.id))) generate();
  else renderMessages();
}

// ------------------------------------------------------------------ events
function initEvents() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.ctrl) state.ctrl.abort();
    else if (document.body.classList.contains("sidebar-open")) setSidebar(false);
  });
  $("stop").addEventListener("click", () => state.ctrl && state.ctrl.abort());
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault());  // the key is needed: Esc stays
  $("new-chat").addEventListener("click", newChat);
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", async (e) => {
    await addFiles([...e.target.files]);
    e.target.value = "";
  });
  document.addEventListener("paste", (e) => {
    const files = e.clipboardData ? [...e.clipboardData.files] : [];
    if (!files.length) return;
    e.preventDefault();
    addFiles(files);
  });
  document.addEventListener("dragover", (e) => {
    if (!e.dataTransfer || ![...e.dataTransfer.types].includes("Files")) return;
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    document.body.classList.remove("dragging");
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    addFiles([...e.dataTransfer.files]);
  });
  $("toggle-sidebar").addEventListener("click", () => setSidebar(true));
  $("close-sidebar").addEventListener("click", () => setSidebar(false));
  document.querySelector("main").addEventListener("click", (e) => {
    if (e.target !== $("toggle-sidebar")) setSidebar(false);
  });
}

// The conversation list as a drawer (phone-sized screens): open or closed.
function setSidebar(open) {
  const was = document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  if (open && !was) $("close-sidebar").focus();
  else if (!open && was) $("toggle-sidebar").focus();
}

// The limits on the controls they concern: the attach button's tooltip, the max tokens field's maximum.
function describeLimits(l) {
  const parts = [];
  if (l.max_images_per_request != null) parts.push(`${l.max_images_per_request} images`);
  if (l.max_videos_per_request != null) parts.push(`${l.max_videos_per_request} videos`);
  if (l.max_request_bytes) parts.push(`${formatBytes(l.max_request_bytes)} in all`);
  $("attach").title = "Attach images or videos (drop or paste them too)" +
    (parts.length ? `; this server takes at most ${parts.join(", ")} per request` : "");
  if (l.max_completion_tokens) $("set-max_tokens").max = String(l.max_completion_tokens);
}

async function init() {
  initSettings();
  initEvents();
  await store.open();
  try {
    state.config = await api.config();
  } catch (e) {
    $("attach-error").textContent = "Could not read the server's settings: " + e.message;
  }
  $("forget-key").hidden = !state.config.api_key_required;
  describeLimits(state.config.limits);
  if (state.config.api_key_required && !apiKey()) await askKey("");
  await loadModels();
  state.conv = newConv();
  await refreshList();
  renderMessages();
  document.body.dataset.ready = "true";
  $("prompt").focus();
}

init();
