// Builds the chat page into the Python package: src/kiln/ui/dist/ (app.js, markdown.js, their
// shared chunks, app.css with KaTeX's stylesheet, and KaTeX's fonts). kiln serves these
// files at /ui/ (src/kiln/server/chat/page.py); the hand-written index.html, style.css and
// favicon.svg stay in src/kiln/ui/.

import { readFile, rm } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.resolve(here, "../src/kiln/ui/dist");

// KaTeX's stylesheet offers each font as woff2, woff and ttf. Every browser the page
// supports (it needs ES modules, dialog and fetch streams) reads woff2, so only that is kept:
// the package ships ~0.3 MB of fonts instead of ~1.3 MB.
const LEGACY_FONT = /,\s*url\([^)]*\.(?:woff|ttf)\) format\("(?:woff|truetype)"\)/g;

/** @type {esbuild.Plugin} */
const woff2Only = {
  name: "katex-woff2-only",
  setup(build) {
    build.onLoad({ filter: /[\\/]katex[\\/]dist[\\/]katex\.css$/ }, async (args) => {
      const css = await readFile(args.path, "utf8");
      const contents = css.replace(LEGACY_FONT, "");
      // A KaTeX release that words its @font-face rules differently fails the build here
      // rather than shipping fonts the page never loads, or missing ones.
      if (contents === css || /\.(?:woff|ttf)\)/.test(contents)) {
        throw new Error("katex.css: its @font-face rules changed; update build.mjs");
      }
      return { contents, loader: "css", resolveDir: path.dirname(args.path) };
    });
  },
};

// Built files are never edited: stale hashed chunks and fonts must not linger.
await rm(outdir, { recursive: true, force: true });

const result = await esbuild.build({
  absWorkingDir: here,
  // markdown.js is an entry of its own: the page tests import the renderer from it.
  entryPoints: { app: "src/app.ts", markdown: "src/markdown.ts" },
  outdir,
  bundle: true,
  format: "esm",
  splitting: true, // app.js and markdown.js share one copy of the libraries
  chunkNames: "chunks/[name]-[hash]",
  assetNames: "fonts/[name]-[hash]",
  loader: { ".woff2": "file" },
  target: ["es2022", "chrome105", "firefox110", "safari16"],
  minify: true,
  legalComments: "eof", // the libraries' licence notices stay with their code
  logLevel: "warning",
  metafile: true,
  plugins: [woff2Only],
});

let total = 0;
for (const [file, { bytes }] of Object.entries(result.metafile.outputs)) {
  total += bytes;
  if (!file.includes("/fonts/")) console.log(`${path.relative(here, file)}  ${bytes} bytes`);
}
const fonts = Object.keys(result.metafile.outputs).filter((f) => f.includes("/fonts/")).length;
console.log(`${fonts} fonts; ${Object.keys(result.metafile.outputs).length} files, ${total} bytes`);
