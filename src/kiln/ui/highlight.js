// Light code highlighting: comments, strings, numbers and keywords, for the languages chat
// answers use most. A scanner, not a parser: good enough to read by, and (like the Markdown
// renderer) it only ever makes Text nodes and <span>s filled with textContent.

const KEYWORDS = {
  python: `and as assert async await break class continue def del elif else except False
    finally for from global if import in is lambda None nonlocal not or pass raise return
    True try while with yield match case self`,
  js: `async await break case catch class const continue debugger default delete do else
    export extends false finally for function if import in instanceof let new null of return
    static super switch this throw true try typeof undefined var void while yield interface
    type enum implements private public readonly`,
  c: `auto break case char const continue default do double else enum extern float for goto
    if inline int long register return short signed sizeof static struct switch typedef union
    unsigned void volatile while bool true false nullptr class namespace template typename
    public private protected virtual override new delete this using std fn let mut impl pub
    use mod match loop trait where crate self Self func package var go defer chan map range
    struct interface`,
  shell: `if then else elif fi for while do done case esac in function return local export
    echo cd exit set unset source`,
  sql: `select from where insert into values update set delete create table drop alter
    index join left right inner outer on group by order having limit offset as and or not
    null is in exists distinct union all primary key foreign references begin commit`,
};

const FAMILIES = {
  python: "python", py: "python",
  javascript: "js", js: "js", typescript: "js", ts: "js", jsx: "js", tsx: "js", json: "js",
  c: "c", h: "c", cpp: "c", "c++": "c", cc: "c", java: "c", rust: "c", rs: "c", go: "c",
  csharp: "c", cs: "c", kotlin: "c", swift: "c",
  sh: "shell", bash: "shell", shell: "shell", zsh: "shell", console: "shell",
  sql: "sql",
};

const HASH_COMMENTS = new Set(["python", "shell"]);
const SLASH_COMMENTS = new Set(["js", "c"]);

const keywordSets = Object.fromEntries(
  Object.entries(KEYWORDS).map(([family, words]) => [family, new Set(words.split(/\s+/))]),
);

function span(className, text) {
  const node = document.createElement("span");
  node.className = className;
  node.textContent = text;
  return node;
}

/** `code` as nodes, highlighted when `language` is one it knows (else one Text node). */
export function highlight(code, language) {
  const family = FAMILIES[(language || "").toLowerCase()];
  if (!family || code.length > 200_000) return [document.createTextNode(code)];
  const keywords = keywordSets[family];
  const caseless = family === "sql";
  const nodes = [];
  let plain = "";
  const flush = () => {
    if (plain) nodes.push(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < code.length) {
    const c = code[i];
    const rest = code.slice(i, i + 2);
    let end = -1;
    let kind = null;
    if ((HASH_COMMENTS.has(family) && c === "#") || (SLASH_COMMENTS.has(family) && rest === "//") ||
        (family === "sql" && rest === "--")) {
      end = code.indexOf("\n", i);
      end = end === -1 ? code.length : end;
      kind = "tok-comment";
    } else if (SLASH_COMMENTS.has(family) && rest === "/*") {
      end = code.indexOf("*/", i + 2);
      end = end === -1 ? code.length : end + 2;
      kind = "tok-comment";
    } else if (c === '"' || c === "'" || (c === "`" && family === "js")) {
      end = i + 1;
      while (end < code.length && code[end] !== c && !(code[end] === "\n" && c !== "`")) {
        end += code[end] === "\\" ? 2 : 1;
      }
      end = Math.min(end + 1, code.length);
      kind = "tok-string";
    } else if (/[0-9]/.test(c) && (i === 0 || !/[\w$]/.test(code[i - 1]))) {
      const match = /^(0x[0-9a-fA-F_]+|[0-9][0-9_]*(\.[0-9_]+)?([eE][+-]?[0-9]+)?)/.exec(
        code.slice(i, i + 64),
      );
      end = i + match[0].length;
      kind = "tok-number";
    } else if (/[A-Za-z_$]/.test(c) && (i === 0 || !/[\w$]/.test(code[i - 1]))) {
      const word = /^[A-Za-z_$][\w$]*/.exec(code.slice(i, i + 128))[0];
      if (keywords.has(caseless ? word.toLowerCase() : word)) {
        kind = "tok-keyword";
      }
      end = i + word.length;
      if (!kind) {
        plain += word;
        i = end;
        continue;
      }
    }
    if (kind) {
      flush();
      nodes.push(span(kind, code.slice(i, end)));
      i = end;
    } else {
      plain += c;
      i++;
    }
  }
  flush();
  return nodes;
}
