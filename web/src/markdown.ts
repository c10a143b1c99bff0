// The Markdown renderer: answers as Markdown (GitHub's: tables, strikethrough, task lists,
// autolinks), code highlighted by highlight.js, LaTeX math typeset by KaTeX; safe by
// construction.
//
// Three layers keep model output from running script in the page:
//  1. marked never passes markup through: its HTML tokenizers are switched off, so `<script>`,
//     `<img onerror>`, `<svg onload>` or any tag in an answer is text, escaped and shown as
//     the characters it is. Links keep only absolute http:, https: and mailto: targets
//     (javascript:, data:, vbscript:, file:, relative addresses... are shown as the text they
//     were); images are never loaded (a safe one becomes a link to it).
//  2. DOMPurify parses what marked made (in an inert document) and keeps only the tags
//     and attributes this renderer makes: no event handlers, no style, no svg, math, script,
//     iframe or img, and URLs only http(s) and mailto.
//  3. The page's Content-Security-Policy (src/kiln/server/chat/page.py) refuses inline and
//     foreign script anyway.
// KaTeX typesets the marked formulas after the sanitiser, with trust off (see math.ts).
//
// This module is also its own entry point of the bundle (/ui/markdown.js), so the page
// tests can run the renderer on known inputs.

import DOMPurify from "dompurify";
import type { Config } from "dompurify";
import { Marked } from "marked";
import type { Tokens } from "marked";

import { el } from "./dom";
import { highlightedHtml } from "./highlight";
import { escapeHtml } from "./html";
import { mathExtension, typesetMath } from "./math";

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
const LINK_REL = "noopener noreferrer nofollow";

/** The safe absolute address `href` names, or null. */
export function safeUrl(href: string): string | null {
  let url: URL;
  try {
    url = new URL(href.trim()); // no base: a relative address throws, and is refused
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

/** Copy `text` to the clipboard; resolves to whether it worked. */
export async function copyText(text: string): Promise<boolean> {
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

export function copyButton(getText: () => string, label = "Copy"): HTMLButtonElement {
  const button = el("button", "copy", label);
  button.type = "button";
  button.addEventListener("click", async () => {
    const ok = await copyText(getText());
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = label), 1200);
  });
  return button;
}

// --- Markdown to HTML (marked) -------------------------------------------------------------

/** A task list's box as a character: no form controls in answers. */
function taskBox(checked: boolean): string {
  return checked ? "\u2611 " : "\u2610 ";
}

// breaks: chat answers mean a single newline as a line break.
const markdown = new Marked({ async: false, gfm: true, breaks: true });
markdown.use(mathExtension, {
  tokenizer: {
    // No raw HTML, block or inline: it stays text (escaped by the text renderer).
    html: () => undefined,
    tag: () => undefined,
  },
  renderer: {
    html: ({ text }) => escapeHtml(text),
    code({ text, lang }) {
      const language = (lang ?? "").trim().split(/\s+/)[0] ?? "";
      return (
        '<div class="code-block"><div class="code-head"><span class="code-language">' +
        `${escapeHtml(language || "text")}</span></div>` +
        `<pre><code>${highlightedHtml(text, language)}</code></pre></div>`
      );
    },
    link(token) {
      const href = safeUrl(token.href);
      // An unsafe or relative target: the whole link is shown as the text it was.
      if (!href) return escapeHtml(token.raw);
      return `<a href="${escapeHtml(href)}">${this.parser.parseInline(token.tokens)}</a>`;
    },
    image(token) {
      // Never loaded: an image from an answer could track the reader (or carry a payload).
      const href = safeUrl(token.href);
      if (!href) return escapeHtml(token.raw);
      return `<a href="${escapeHtml(href)}">${escapeHtml(`[image: ${token.text || href}]`)}</a>`;
    },
    table(token) {
      const cell = (tag: "th" | "td", c: Tokens.TableCell): string => {
        const align = c.align ? ` class="align-${c.align}"` : "";
        return `<${tag}${align}>${this.parser.parseInline(c.tokens)}</${tag}>`;
      };
      const head = token.header.map((c) => cell("th", c)).join("");
      const rows = token.rows.map((row) => `<tr>${row.map((c) => cell("td", c)).join("")}</tr>`);
      return (
        `<div class="table-wrap"><table><thead><tr>${head}</tr></thead>` +
        `<tbody>${rows.join("")}</tbody></table></div>`
      );
    },
    listitem(item) {
      // Every item's text is a paragraph, tight list or loose: the same spacing either way.
      // A tight task item's box comes as a token of its own: it goes in the first paragraph.
      let box = "";
      const parts: string[] = [];
      for (const token of item.tokens) {
        if (token.type === "checkbox") {
          box = taskBox(Boolean(token.checked));
        } else if ((token.type === "text" || token.type === "paragraph") && token.tokens) {
          parts.push(`<p>${box}${this.parser.parseInline(token.tokens)}</p>`);
          box = "";
        } else {
          parts.push(this.parser.parse([token]));
        }
      }
      if (box) parts.unshift(`<p>${box}</p>`);
      return `<li>${parts.join("")}</li>`;
    },
    checkbox: ({ checked }) => taskBox(checked),
  },
});

// --- sanitising (DOMPurify) ----------------------------------------------------------------

/** Exactly what the renderer above makes; everything else is removed. */
const PURIFY: Config & { RETURN_DOM_FRAGMENT: true } = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "code", "del", "div", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "li", "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th", "thead",
    "tr", "ul",
  ],
  ALLOWED_ATTR: ["href", "class", "start"],
  // Named too, so that widening the lists above cannot let these in by accident.
  FORBID_TAGS: [
    "script", "style", "iframe", "frame", "object", "embed", "svg", "math", "img", "video",
    "audio", "source", "form", "input", "button", "link", "meta", "base", "template",
  ],
  FORBID_ATTR: ["style", "srcset", "src", "action", "formaction", "xlink:href"],
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
  // DOMPurify checks every attribute that is not "URI-safe" against the URL pattern above; a
  // list's start number is no URL.
  ADD_URI_SAFE_ATTR: ["start"],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  ALLOW_UNKNOWN_PROTOCOLS: false,
  RETURN_DOM_FRAGMENT: true,
};

// Elements whose whitespace-only text children are only marked's line ends between blocks.
const BLOCK_CONTAINERS = new Set([
  "BLOCKQUOTE", "DIV", "LI", "OL", "TABLE", "TBODY", "THEAD", "TR", "UL",
]);

function dropBlockWhitespace(root: DocumentFragment): void {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const drop: Text[] = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentNode;
    const container = parent === root || BLOCK_CONTAINERS.has((parent as Element).tagName);
    if (container && !node.nodeValue?.trim()) drop.push(node as Text);
  }
  for (const node of drop) node.remove();
}

/** Every link: a safe target (checked again), opened elsewhere, telling it nothing. */
function finishLinks(root: DocumentFragment): void {
  for (const link of root.querySelectorAll("a")) {
    const href = safeUrl(link.getAttribute("href") ?? "");
    if (!href) {
      link.replaceWith(document.createTextNode(link.textContent ?? ""));
      continue;
    }
    for (const name of link.getAttributeNames()) link.removeAttribute(name);
    link.setAttribute("href", href);
    link.setAttribute("rel", LINK_REL);
    link.setAttribute("target", "_blank");
  }
}

function addCopyButtons(root: DocumentFragment): void {
  for (const block of root.querySelectorAll(".code-block")) {
    const code = block.querySelector("pre code");
    block.querySelector(".code-head")?.append(copyButton(() => code?.textContent ?? ""));
  }
}

/** Render Markdown `text` as a DocumentFragment. */
export function renderMarkdown(text: string): DocumentFragment {
  let fragment: DocumentFragment;
  try {
    const html = markdown.parse(String(text), { async: false });
    fragment = DOMPurify.sanitize(html, PURIFY);
  } catch {
    // The renderer failed on this text: it is shown as it is rather than not at all.
    fragment = document.createDocumentFragment();
    fragment.append(el("p", null, String(text)));
    return fragment;
  }
  dropBlockWhitespace(fragment);
  finishLinks(fragment);
  addCopyButtons(fragment);
  typesetMath(fragment);
  return fragment;
}
