// Answers as DOM: a small Markdown renderer (headings, lists, code blocks, tables, quotes, inline code, bold,
// italic, http(s) links) and Qwen2-VL's grounding tokens. Every piece of text enters the page through
// createTextNode / textContent: nothing the model writes is ever parsed as HTML.

const NUM = "\\s*(-?\\d+(?:\\.\\d+)?)\\s*";
const GROUND = new RegExp(
  "<\\|object_ref_start\\|>([\\s\\S]*?)<\\|object_ref_end\\|>" +
  "|<\\|box_start\\|>\\s*\\(" + NUM + "," + NUM + "\\)\\s*,?\\s*\\(" + NUM + "," + NUM + "\\)\\s*<\\|box_end\\|>" +
  "|<\\|(?:box|quad)_start\\|>[\\s\\S]*?<\\|(?:box|quad)_end\\|>", "g");
// An unfinished grounding span at the end of a streamed answer, or the start of a special token.
const PARTIAL = /(<\|(?:object_ref|box|quad)_start\|>[\s\S]*|<\|?[a-z_]*\|?)$/;

// Text with grounding -> {text with markers, refs: [{label, box}], boxes: [{label, x1, y1, x2, y2}]}.
// A box takes the label of the reference just before it (several boxes may follow one reference).
export function parseGrounding(raw, partial) {
  const refs = [], boxes = [];
  let last = null;
  let text = raw.replace(GROUND, (m, label, x1, y1, x2, y2) => {
    if (label !== undefined) {
      last = { label: label.trim(), box: null };
      refs.push(last);
      return "\uE000" + (refs.length - 1) + "\uE001";
    }
    if (x1 === undefined) return "";  // a quad, or a box the page cannot read: not drawn, not shown
    const box = { label: last ? last.label : "box " + (boxes.length + 1),
                  x1: +x1, y1: +y1, x2: +x2, y2: +y2 };
    boxes.push(box);
    if (last && last.box === null) { last.box = boxes.length - 1; return ""; }
    return "\uE002" + (boxes.length - 1) + "\uE001";
  });
  if (partial) text = text.replace(PARTIAL, "");
  return { text, refs, boxes };
}

// Text with the markers of parseGrounding -> the labels they stand for (code, copied text).
function labels(text, g) {
  return text.replace(/\uE000(\d+)\uE001/g, (m, i) => (g.refs[+i] ? g.refs[+i].label : ""))
    .replace(/\uE002(\d+)\uE001/g, (m, i) => (g.boxes[+i] ? g.boxes[+i].label : ""));
}

// The answer as plain text (for copying): grounding spans become their labels.
export function plainText(raw) {
  const g = parseGrounding(raw, false);
  return labels(g.text, g);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const INLINE = new RegExp([
  "(`+)([\\s\\S]*?[^`])\\1(?!`)",            // 1, 2: code
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",       // 3: bold
  "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])",  // 4: bold
  "\\*(?=[^\\s*])([^*]*?[^\\s*])\\*",         // 5: italic
  "(?<![\\w])_(?=[^\\s_])([^_]*?[^\\s_])_(?![\\w])",  // 6: italic
  "~~(?=\\S)([\\s\\S]*?\\S)~~",               // 7: strike
  "\\[([^\\]\\n]+)\\]\\((https?:\\/\\/[^\\s)]+)\\)",  // 8, 9: link
  "(https?:\\/\\/[^\\s<>()\\[\\]]*[^\\s<>()\\[\\].,;:!?'\"])",  // 10: bare URL
  "\\uE000(\\d+)\\uE001|\\uE002(\\d+)\\uE001",  // 11, 12: grounding markers
].join("|"), "g");

function link(href, text) {
  const a = el("a", null, text);
  a.href = href;  // only http(s): the patterns above allow nothing else
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  return a;
}

function refNode(g, i) {
  const ref = g.refs[i];
  if (!ref) return document.createTextNode("");
  const span = el("span", "ref", ref.label);
  if (ref.box !== null) {
    span.dataset.box = String(ref.box);
    span.classList.add("c" + (ref.box % 6));
  }
  return span;
}

function boxChip(g, i) {
  const b = g.boxes[i];
  if (!b) return document.createTextNode("");
  const span = el("span", "ref chip c" + (i % 6), b.label);
  span.dataset.box = String(i);
  return span;
}

// Inline Markdown of one run of text -> appended to parent.
function inline(parent, text, g) {
  let at = 0, m;
  const re = new RegExp(INLINE.source, "g");
  while ((m = re.exec(text)) !== null) {
    if (m.index > at) parent.append(text.slice(at, m.index));
    at = m.index + m[0].length;
    if (m[2] !== undefined) parent.append(el("code", null, labels(m[2].replace(/^ (.*) $/, "$1"), g)));
    else if (m[3] !== undefined || m[4] !== undefined) inline(parent.appendChild(el("strong")), m[3] ?? m[4], g);
    else if (m[5] !== undefined || m[6] !== undefined) inline(parent.appendChild(el("em")), m[5] ?? m[6], g);
    else if (m[7] !== undefined) inline(parent.appendChild(el("del")), m[7], g);
    else if (m[8] !== undefined) parent.append(link(m[9], m[8]));
    else if (m[10] !== undefined) parent.append(link(m[10], m[10]));
    else if (m[11] !== undefined) parent.append(refNode(g, +m[11]));
    else if (m[12] !== undefined) parent.append(boxChip(g, +m[12]));
  }
  if (at < text.length) parent.append(text.slice(at));
  return parent;
}

// Lines of a paragraph: joined with line breaks.
function paragraph(lines, g) {
  const p = el("p");
  lines.forEach((line, k) => {
    if (k) p.append(el("br"));
    inline(p, line.trim(), g);
  });
  return p;
}

const FENCE = /^\s*(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function startsBlock(lines, i) {
  const l = lines[i];
  return FENCE.test(l) || HEADING.test(l) || RULE.test(l) || LIST.test(l) || QUOTE.test(l) ||
    (l.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-"));
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, g) {
  const head = cells(lines[i]);
  const align = cells(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : ""));
  const wrap = el("div", "table-wrap"), t = wrap.appendChild(el("table"));
  const tr = t.appendChild(el("thead")).appendChild(el("tr"));
  head.forEach((c, k) => { const th = inline(tr.appendChild(el("th")), c, g); if (align[k]) th.style.textAlign = align[k]; });
  const body = t.appendChild(el("tbody"));
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = body.appendChild(el("tr"));
    cells(lines[i]).forEach((c, k) => {
      if (k >= head.length) return;
      const td = inline(row.appendChild(el("td")), c, g);
      if (align[k]) td.style.textAlign = align[k];
    });
    i++;
  }
  return [wrap, i];
}

function list(lines, i, g) {
  const first = LIST.exec(lines[i]);
  const indent = first[1].length, ordered = /\d/.test(first[2]);
  const root = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) root.start = parseInt(first[2], 10);
  let li = null;
  while (i < lines.length) {
    const line = lines[i], m = LIST.exec(line);
    if (!line.trim()) {  // a blank line ends the list unless an item of it follows
      let j = i + 1;
      while (j < lines.length && !lines[j].trim()) j++;
      const n = j < lines.length ? LIST.exec(lines[j]) : null;
      if (!n || n[1].length < indent) break;
      i = j;
      continue;
    }
    if (m && m[1].length > indent && li) {
      const [sub, next] = list(lines, i, g);
      li.append(sub);
      i = next;
      continue;
    }
    if (m && (m[1].length < indent || /\d/.test(m[2]) !== ordered)) break;
    if (m) {
      li = inline(root.appendChild(el("li")), m[3], g);
    } else if (li && /^\s+/.test(line) && !startsBlock(lines, i)) {
      li.append(el("br"));
      inline(li, line.trim(), g);
    } else break;
    i++;
  }
  return [root, i];
}

function code(lines, i, g) {
  const open = FENCE.exec(lines[i]);
  const body = [];
  i++;
  while (i < lines.length && !(lines[i].trim().startsWith(open[1]) && !lines[i].trim().slice(open[1].length).trim())) {
    body.push(lines[i]);
    i++;
  }
  const pre = el("pre");
  if (open[2]) pre.dataset.lang = open[2];
  pre.append(el("code", null, labels(body.join("\n"), g)));
  return [pre, i + 1];
}

// Markdown lines -> nodes appended to parent.
function blocks(parent, lines, g) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if (FENCE.test(line)) { const [n, j] = code(lines, i, g); parent.append(n); i = j; continue; }
    if ((m = HEADING.exec(line))) { parent.append(inline(el("h" + m[1].length), m[2], g)); i++; continue; }
    if (RULE.test(line)) { parent.append(el("hr")); i++; continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const [n, j] = table(lines, i, g); parent.append(n); i = j; continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(QUOTE.exec(lines[i++])[1]);
      blocks(parent.appendChild(el("blockquote")), inner, g);
      continue;
    }
    if (LIST.test(line)) { const [n, j] = list(lines, i, g); parent.append(n); i = j; continue; }
    const para = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) para.push(lines[i++]);
    parent.append(paragraph(para, g));
  }
  return parent;
}

// An answer -> {node: a div of its Markdown, boxes: the grounding boxes it names}. partial: still streaming
// (an unfinished grounding span at the end is not shown yet).
export function renderAnswer(raw, partial) {
  const g = parseGrounding(raw, partial);
  const node = blocks(el("div", "md"), g.text.replace(/\r\n?/g, "\n").split("\n"), g);
  return { node, boxes: g.boxes };
}
