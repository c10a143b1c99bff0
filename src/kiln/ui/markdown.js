// A small Markdown renderer that is safe by construction.
//
// It never produces markup from text: every node is made with document.createElement and
// every piece of text goes in with textContent (or a Text node), so `<script>`, `<img
// onerror>` or an SVG payload in a model's answer is shown as the characters it is. Links
// keep only http:, https: and mailto: targets (javascript:, data:, vbscript:, relative
// URLs... are shown as text); images are shown as their alt text and address, never loaded.
//
// Supported: headings, paragraphs (single newlines are line breaks, as chat answers expect),
// fenced code blocks (with a Copy button and light highlighting), inline code, emphasis,
// strong, strikethrough, links, autolinks, block quotes, ordered and unordered lists (nested),
// GitHub tables and horizontal rules. Unclosed constructs (an answer still streaming) render
// as far as they go.

import { highlight } from "./highlight.js";

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

/** The safe absolute address `href` names, or null. */
export function safeUrl(href) {
  let url;
  try {
    url = new URL(href.trim()); // no base: a relative address throws, and is refused
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Copy `text` to the clipboard; resolves to whether it worked. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (an insecure context): the old way, through a hidden text area.
    const area = el("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

export function copyButton(getText, label = "Copy") {
  const button = el("button", "copy", label);
  button.type = "button";
  button.addEventListener("click", async () => {
    const ok = await copyText(getText());
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = label), 1200);
  });
  return button;
}

// --- blocks -----------------------------------------------------------------------------

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])(?: +(.*))?$/;
const TABLE_DIVIDER = /^ *\|? *:?-+:? *(?:\| *:?-+:? *)*\|? *$/;

/** Render Markdown `text` as a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
  return fragment;
}

function isBlank(line) {
  return line.trim() === "";
}

function startsBlock(lines, i) {
  const line = lines[i];
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    LIST_ITEM.test(line) ||
    isTableStart(lines, i)
  );
}

function isTableStart(lines, i) {
  return (
    lines[i].includes("|") && i + 1 < lines.length && TABLE_DIVIDER.test(lines[i + 1]) &&
    lines[i + 1].includes("-")
  );
}

function renderBlocks(lines, parent, depth) {
  if (depth > 20) {
    // Pathologically deep nesting: the rest as plain text rather than a deep recursion.
    parent.append(el("p", null, lines.join("\n")));
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let match;
    if ((match = FENCE.exec(line))) {
      i = renderFence(lines, i, match, parent);
    } else if ((match = HEADING.exec(line))) {
      const heading = el(`h${match[1].length}`);
      heading.append(...inline(match[2] || ""));
      parent.append(heading);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const quoted = QUOTE.exec(lines[i]);
        inner.push(quoted ? quoted[1] : lines[i]);
        i++;
      }
      const quote = el("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.append(quote);
    } else if (isTableStart(lines, i)) {
      i = renderTable(lines, i, parent);
    } else if (LIST_ITEM.test(line)) {
      i = renderList(lines, i, parent, depth);
    } else {
      const paragraph = [];
      while (i < lines.length && !isBlank(lines[i]) && (paragraph.length === 0 || !startsBlock(lines, i))) {
        paragraph.push(lines[i].trim());
        i++;
      }
      const p = el("p");
      p.append(...inline(paragraph.join("\n")));
      parent.append(p);
    }
  }
}

function renderFence(lines, start, match, parent) {
  const fence = match[1];
  const language = match[2] || "";
  const body = [];
  let i = start + 1;
  while (i < lines.length) {
    const closing = lines[i].trim();
    if (closing.startsWith(fence[0].repeat(fence.length)) && /^([`~])\1*$/.test(closing)) {
      i++;
      break;
    }
    body.push(lines[i]);
    i++;
  }
  const code = body.join("\n");
  const box = el("div", "code-block");
  const head = el("div", "code-head");
  head.append(el("span", "code-language", language || "text"), copyButton(() => code));
  const pre = el("pre");
  const codeNode = el("code");
  codeNode.append(...highlight(code, language));
  pre.append(codeNode);
  box.append(head, pre);
  parent.append(box);
  return i;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  const cells = [];
  let current = "";
  let inCode = false;
  for (let i = 0; i < row.length; i++) {
    const c = row[i];
    if (c === "\\" && row[i + 1] === "|") {
      current += "|";
      i++;
    } else if (c === "`") {
      inCode = !inCode;
      current += c;
    } else if (c === "|" && !inCode) {
      cells.push(current.trim());
      current = "";
    } else {
      current += c;
    }
  }
  cells.push(current.trim());
  return cells;
}

function renderTable(lines, start, parent) {
  const header = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((cell) => {
    const left = cell.startsWith(":");
    const right = cell.endsWith(":");
    return left && right ? "center" : right ? "right" : left ? "left" : "";
  });
  const table = el("table");
  const head = el("thead");
  const headRow = el("tr");
  header.forEach((cell, c) => {
    const th = el("th");
    if (aligns[c]) th.className = `align-${aligns[c]}`;
    th.append(...inline(cell));
    headRow.append(th);
  });
  head.append(headRow);
  table.append(head);
  const body = el("tbody");
  let i = start + 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    const cells = splitRow(lines[i]);
    const tr = el("tr");
    for (let c = 0; c < header.length; c++) {
      const td = el("td");
      if (aligns[c]) td.className = `align-${aligns[c]}`;
      td.append(...inline(cells[c] ?? ""));
      tr.append(td);
    }
    body.append(tr);
    i++;
  }
  table.append(body);
  const wrapper = el("div", "table-wrap");
  wrapper.append(table);
  parent.append(wrapper);
  return i;
}

function renderList(lines, start, parent, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered) {
    const number = parseInt(first[2], 10);
    if (number !== 1) list.start = number;
  }
  let i = start;
  while (i < lines.length) {
    const match = LIST_ITEM.exec(lines[i]);
    if (!match || match[1].length !== indent || /\d/.test(match[2]) !== ordered) break;
    const contentIndent = indent + match[2].length + 1;
    const itemLines = [match[3] || ""];
    i++;
    // The item runs on over indented lines (a nested list, a continued paragraph) and over
    // blank lines followed by indented ones.
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        if (i + 1 < lines.length && leadingSpaces(lines[i + 1]) >= contentIndent) {
          itemLines.push("");
          i++;
          continue;
        }
        break;
      }
      const spaces = leadingSpaces(line);
      if (spaces > indent) {
        itemLines.push(line.slice(Math.min(spaces, contentIndent)));
        i++;
      } else if (!startsBlock(lines, i) && !isBlank(lines[i - 1])) {
        itemLines.push(line.trim()); // a lazy continuation of the item's paragraph
        i++;
      } else {
        break;
      }
    }
    const item = el("li");
    renderBlocks(itemLines, item, depth + 1);
    list.append(item);
    // Blank lines between items of the same list keep the list going.
    let next = i;
    while (next < lines.length && isBlank(lines[next])) next++;
    const following = next < lines.length ? LIST_ITEM.exec(lines[next]) : null;
    if (next !== i && following && following[1].length === indent) i = next;
  }
  parent.append(list);
  return i;
}

function leadingSpaces(line) {
  return line.length - line.trimStart().length;
}

// --- inline -----------------------------------------------------------------------------

const ESCAPABLE = /[\\`*_{}[\]()#+\-.!|~<>"']/;
const AUTOLINK = /<((?:https?|mailto):[^\s<>]+)>/y;
const BARE_URL = /https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]}]/y;

/** Inline Markdown `text` as a list of nodes (Text nodes and elements). */
export function inline(text, depth = 0) {
  const nodes = [];
  let plain = "";
  const flush = () => {
    if (plain) nodes.push(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && ESCAPABLE.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      nodes.push(el("br"));
      i++;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(text.slice(i))[0];
      const end = text.indexOf(run, i + run.length);
      if (end !== -1) {
        flush();
        nodes.push(el("code", null, text.slice(i + run.length, end).replace(/^ (.+) $/, "$1")));
        i = end + run.length;
        continue;
      }
      plain += run;
      i += run.length;
      continue;
    }
    if (depth < 8 && (c === "*" || c === "_" || c === "~")) {
      const span = emphasis(text, i, depth);
      if (span) {
        flush();
        nodes.push(span.node);
        i = span.end;
        continue;
      }
    }
    if (c === "[" || (c === "!" && text[i + 1] === "[")) {
      const link = linkAt(text, i, depth);
      if (link) {
        flush();
        nodes.push(...link.nodes);
        i = link.end;
        continue;
      }
    }
    if (c === "<") {
      AUTOLINK.lastIndex = i;
      const match = AUTOLINK.exec(text);
      if (match && safeUrl(match[1])) {
        flush();
        nodes.push(anchor(safeUrl(match[1]), [document.createTextNode(match[1])]));
        i = AUTOLINK.lastIndex;
        continue;
      }
    }
    if (c === "h" && (i === 0 || /[\s(]/.test(text[i - 1]))) {
      BARE_URL.lastIndex = i;
      const match = BARE_URL.exec(text);
      if (match && safeUrl(match[0])) {
        flush();
        nodes.push(anchor(safeUrl(match[0]), [document.createTextNode(match[0])]));
        i = BARE_URL.lastIndex;
        continue;
      }
    }
    plain += c;
    i++;
  }
  flush();
  return nodes;
}

function emphasis(text, i, depth) {
  const marker = text[i];
  const double = text[i + 1] === marker;
  if (marker === "~" && !double) return null;
  const delimiter = double ? marker + marker : marker;
  const start = i + delimiter.length;
  if (start >= text.length || /\s/.test(text[start])) return null;
  // Intraword underscores (snake_case) are not emphasis.
  if (marker === "_" && i > 0 && /\w/.test(text[i - 1])) return null;
  let search = start;
  while (search < text.length) {
    const end = text.indexOf(delimiter, search);
    if (end === -1) return null;
    const closesWord = !/\s/.test(text[end - 1]) && end > start;
    const notLonger = double || text[end + 1] !== marker;
    const underscoreOk = marker !== "_" || !/\w/.test(text[end + delimiter.length] || "");
    if (closesWord && notLonger && underscoreOk) {
      const tag = marker === "~" ? "del" : double ? "strong" : "em";
      const node = el(tag);
      node.append(...inline(text.slice(start, end), depth + 1));
      return { node, end: end + delimiter.length };
    }
    search = end + delimiter.length;
  }
  return null;
}

function linkAt(text, i, depth) {
  const image = text[i] === "!";
  const open = image ? i + 1 : i;
  const close = matchingBracket(text, open);
  if (close === -1 || text[close + 1] !== "(") return null;
  const end = text.indexOf(")", close + 2);
  if (end === -1) return null;
  const label = text.slice(open + 1, close);
  const target = text.slice(close + 2, end).trim().split(/\s+/)[0] || "";
  const href = safeUrl(target.replace(/^<(.*)>$/, "$1"));
  if (image) {
    // Never loaded: an image from an answer could track the reader (or carry a payload).
    const shown = href ? [anchor(href, [document.createTextNode(`[image: ${label || href}]`)])]
      : [document.createTextNode(text.slice(i, end + 1))];
    return { nodes: shown, end: end + 1 };
  }
  if (!href) {
    // An unsafe or relative target: the whole link is shown as the text it was.
    return { nodes: [document.createTextNode(text.slice(i, end + 1))], end: end + 1 };
  }
  return { nodes: [anchor(href, inline(label, depth + 1))], end: end + 1 };
}

function matchingBracket(text, open) {
  let level = 0;
  for (let i = open; i < text.length; i++) {
    if (text[i] === "\\") {
      i++;
    } else if (text[i] === "[") {
      level++;
    } else if (text[i] === "]") {
      level--;
      if (level === 0) return i;
    }
  }
  return -1;
}

function anchor(href, children) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.append(...children);
  return a;
}
