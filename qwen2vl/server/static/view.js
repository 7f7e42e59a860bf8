// One message of the conversation -> its DOM: the user's text and thumbnails; the answer's Markdown, its grounding
// boxes drawn on the image they refer to, tool-call cards, its numbers (TTFT, tokens/s, usage) and its buttons.

import { renderAnswer } from "./markdown.js";
import { thumbnail } from "./attach.js";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, aria, onClick) {
  const b = el("button", null, label);
  b.type = "button";
  b.setAttribute("aria-label", aria);
  b.addEventListener("click", onClick);
  return b;
}

const clamp = (v) => Math.min(1000, Math.max(0, v));

// The boxes (0-1000 coordinates of the image) drawn over a copy of the image, labelled.
function groundingFigure(boxes, image) {
  const fig = el("figure", "ground");
  const stage = fig.appendChild(el("div", "stage"));
  const img = stage.appendChild(el("img"));
  img.src = image.url;
  img.alt = `${image.name} with ${boxes.length} box${boxes.length > 1 ? "es" : ""}`;
  boxes.forEach((b, i) => {
    const [x1, x2] = [clamp(Math.min(b.x1, b.x2)), clamp(Math.max(b.x1, b.x2))];
    const [y1, y2] = [clamp(Math.min(b.y1, b.y2)), clamp(Math.max(b.y1, b.y2))];
    const box = stage.appendChild(el("div", "box c" + (i % 6)));
    box.style.left = x1 / 10 + "%";
    box.style.top = y1 / 10 + "%";
    box.style.width = (x2 - x1) / 10 + "%";
    box.style.height = (y2 - y1) / 10 + "%";
    box.dataset.coords = [b.x1, b.y1, b.x2, b.y2].join(",");
    box.append(el("span", "box-label", b.label));
  });
  return fig;
}

function prettyArgs(args) {
  try {
    return JSON.stringify(JSON.parse(args), null, 2);
  } catch (e) {
    return args;
  }
}

function toolCard(call, answered, onResult) {
  const card = el("div", "tool-card");
  card.append(el("div", "tool-name", call.function.name));
  const pre = card.appendChild(el("pre"));
  pre.append(el("code", null, prettyArgs(call.function.arguments || "")));
  if (!answered && onResult) {
    const form = card.appendChild(el("form", "tool-result"));
    const label = form.appendChild(el("label", null, "Result "));
    const input = label.appendChild(el("input"));
    input.setAttribute("aria-label", `Result of ${call.function.name}`);
    const send = form.appendChild(el("button", null, "Send result"));
    send.type = "submit";
    form.addEventListener("submit", (e) => { e.preventDefault(); onResult(call, input.value); });
  }
  return card;
}

export function statsLine(m) {
  const parts = [];
  if (m.ttft != null) parts.push(`TTFT ${m.ttft.toFixed(2)} s`);
  if (m.tps != null) parts.push(`${m.tps.toFixed(1)} tok/s`);
  const u = m.usage;
  if (u) {
    const cached = u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens;
    parts.push(`prompt ${u.prompt_tokens}` + (cached != null ? ` (cached ${cached})` : ""));
    parts.push(`completion ${u.completion_tokens}`);
  }
  if (m.finish && m.finish !== "stop") parts.push(`finish: ${m.finish}`);
  return parts.join(" · ");
}

function assistantBody(div, msg, ctx) {
  const { node, boxes } = renderAnswer(msg.text, ctx.streaming);
  div.append(node);
  if (boxes.length && ctx.refImage) div.append(groundingFigure(boxes, ctx.refImage));
  else if (boxes.length) div.append(el("p", "note", "The answer names boxes, but no image came before it."));
  for (const call of msg.toolCalls || []) div.append(toolCard(call, ctx.answered.has(call.id), ctx.onToolResult));
  if (msg.stopped) div.append(el("p", "note", "Stopped."));
  if (msg.error) div.append(el("p", "error", msg.error));
  const stats = statsLine(msg);
  if (stats) div.append(el("p", "stats", stats));
  if (!ctx.streaming) {
    const actions = div.appendChild(el("div", "actions"));
    actions.append(button("Copy", "Copy this answer", ctx.onCopy));
    if (ctx.isLast) actions.append(button("Regenerate", "Regenerate this answer", ctx.onRegenerate));
  }
}

// msg -> element. ctx: {streaming, isLast, refImage, answered (tool call ids with a result), onCopy,
// onRegenerate, onToolResult}.
export function messageView(msg, ctx) {
  const div = el("div", "msg " + msg.role);
  div.dataset.role = msg.role;
  if (msg.role === "user") {
    if (msg.attachments && msg.attachments.length) {
      const thumbs = div.appendChild(el("div", "thumbs"));
      for (const a of msg.attachments) thumbs.append(thumbnail(a, null));
    }
    if (msg.text) div.append(el("div", "text", msg.text));
  } else if (msg.role === "tool") {
    div.append(el("div", "tool-name", `Result of ${msg.name}`));
    div.append(el("div", "text", msg.text));
  } else {
    div.dataset.state = ctx.streaming ? "streaming" : msg.error ? "error" : msg.stopped ? "stopped" : "done";
    div.dataset.deltas = String(msg.deltas || 0);
    assistantBody(div, msg, ctx);
  }
  return div;
}
