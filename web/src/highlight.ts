// Code highlighting with highlight.js: its core and the languages chat answers use most
// (not the whole set: each language is code in the bundle). It only ever returns highlight.js's
// escaped markup (<span class="hljs-...">), which the Markdown renderer's sanitiser then checks.

import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import csharp from "highlight.js/lib/languages/csharp";
import css from "highlight.js/lib/languages/css";
import diff from "highlight.js/lib/languages/diff";
import dockerfile from "highlight.js/lib/languages/dockerfile";
import go from "highlight.js/lib/languages/go";
import ini from "highlight.js/lib/languages/ini";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import kotlin from "highlight.js/lib/languages/kotlin";
import makefile from "highlight.js/lib/languages/makefile";
import markdown from "highlight.js/lib/languages/markdown";
import php from "highlight.js/lib/languages/php";
import plaintext from "highlight.js/lib/languages/plaintext";
import python from "highlight.js/lib/languages/python";
import ruby from "highlight.js/lib/languages/ruby";
import rust from "highlight.js/lib/languages/rust";
import shell from "highlight.js/lib/languages/shell";
import sql from "highlight.js/lib/languages/sql";
import swift from "highlight.js/lib/languages/swift";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";

import { escapeHtml } from "./html";

const LANGUAGES = {
  bash,
  c,
  cpp,
  csharp,
  css,
  diff,
  dockerfile,
  go,
  ini,
  java,
  javascript,
  json,
  kotlin,
  makefile,
  markdown,
  php,
  plaintext,
  python,
  ruby,
  rust,
  shell,
  sql,
  swift,
  typescript,
  xml,
  yaml,
};
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);
// Chat answers also say `console` and `zsh` for shell sessions; highlight.js's own aliases
// cover the rest (py, js, ts, sh, rs, html, yml, toml...).
hljs.registerAliases(["zsh", "console"], { languageName: "bash" });

/** Past this size a code block is shown unhighlighted: the page repaints it as it streams. */
const MAX_HIGHLIGHTED = 200_000;

/** `code` as HTML: highlighted when `language` is one it knows, else just escaped. */
export function highlightedHtml(code: string, language: string): string {
  if (!language || code.length > MAX_HIGHLIGHTED || !hljs.getLanguage(language)) {
    return escapeHtml(code);
  }
  try {
    // ignoreIllegals: half-written code (an answer still streaming) is highlighted anyway.
    return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    return escapeHtml(code);
  }
}
