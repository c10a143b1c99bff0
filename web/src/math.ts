// LaTeX math in answers: $...$ and \(...\) inline, $$...$$ and \[...\] displayed, typeset by
// KaTeX.
//
// The Markdown pass only marks math (an element with class math-inline or math-display
// holding the TeX as text); KaTeX typesets it after the sanitiser has run, with
// katex.render, which builds DOM nodes and sets their styles through the CSSOM. That is what
// lets the page keep style-src 'self' without 'unsafe-inline': a CSP blocks style
// attributes written in markup, not styles set from script. KaTeX runs with trust: false,
// so \href, \url, \includegraphics and \html... (the commands that could add links, images,
// classes or styles) are refused, and TeX from a model can only ever make math.

import katex from "katex";
import type { MarkedExtension, Tokens } from "marked";

import { escapeHtml } from "./html";

interface MathToken extends Tokens.Generic {
  type: "math";
  text: string;
  display: boolean;
  /** A formula on lines of its own (a block), not in a line of text. */
  block: boolean;
}

// A display formula on lines of its own: $$ ... $$ or \[ ... \].
const BLOCK = /^ {0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n+|$)/;
const BLOCK_START = /^ {0,3}(?:\$\$|\\\[)/m;
// Inline: $$...$$ and \[...\] display, \(...\) and $...$ in the line. A single $ opens only
// before a non-space and closes only after one and before no digit (so "$5 and $10" stays
// text), as Pandoc reads it; nor does it span a backtick (a code span there wins).
const INLINE: [RegExp, boolean][] = [
  [/^\$\$((?:\\[\s\S]|[^\\$])+?)\$\$/, true],
  [/^\\\[([\s\S]+?)\\\]/, true],
  [/^\\\(([\s\S]+?)\\\)/, false],
  [/^\$(?![\s$])((?:\\[^\n]|[^\\$\n`])+?)(?<![\s\\])\$(?!\d)/, false],
];
const INLINE_START = /\$|\\[([]/;

function mathToken(raw: string, text: string, display: boolean, block: boolean): MathToken {
  return { type: "math", raw, text: text.trim(), display, block };
}

/** The Markdown extension that finds math and marks it for {@link typesetMath}. */
export const mathExtension: MarkedExtension = {
  extensions: [
    {
      name: "math",
      level: "block",
      start(src) {
        return BLOCK_START.exec(src)?.index;
      },
      tokenizer(src) {
        const match = BLOCK.exec(src);
        if (!match) return undefined;
        return mathToken(match[0], match[1] ?? match[2] ?? "", true, true);
      },
    },
    {
      name: "math",
      level: "inline",
      start(src) {
        const index = src.search(INLINE_START);
        return index === -1 ? undefined : index;
      },
      tokenizer(src) {
        for (const [pattern, display] of INLINE) {
          const match = pattern.exec(src);
          if (match) return mathToken(match[0], match[1] ?? "", display, false);
        }
        return undefined;
      },
    },
    {
      name: "math",
      renderer(token) {
        const { text, display, block } = token as MathToken;
        const tag = block ? "div" : "span";
        const className = display ? "math-display" : "math-inline";
        return `<${tag} class="${className}">${escapeHtml(text)}</${tag}>`;
      },
    },
  ],
};

const KATEX_OPTIONS = {
  throwOnError: false, // a formula with an error shows its source, marked, not an exception
  trust: false,
  strict: "ignore" as const, // non-standard TeX is typeset quietly (no console warnings)
  maxSize: 50, // em: a formula cannot draw boxes that cover the page
  maxExpand: 1000, // macro expansions: a formula cannot hang the tab
  output: "htmlAndMathml" as const, // MathML for screen readers beside the visual HTML
};

/** Typeset every formula the Markdown pass marked under `root`. */
export function typesetMath(root: ParentNode): void {
  for (const node of root.querySelectorAll<HTMLElement>(".math-inline, .math-display")) {
    const tex = node.textContent ?? "";
    try {
      katex.render(tex, node, { ...KATEX_OPTIONS, displayMode: node.matches(".math-display") });
    } catch {
      node.textContent = tex; // not a TeX error (those render marked): left as its source
    }
  }
}
