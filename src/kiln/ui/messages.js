// One message of the branch shown: its text (Markdown for answers, plain text for what the
// user typed), who wrote it, its status, and its actions: the `< 2/3 >` sibling switcher,
// Copy, Edit (user messages) and Regenerate (answers).

import { copyButton, renderMarkdown } from "./markdown.js";

const STATUS_NOTES = {
  stopped: "Stopped.",
  interrupted: "Interrupted: the server stopped while writing this answer.",
  error: "The answer failed.",
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, className, onClick, disabled) {
  const node = el("button", className, label);
  node.type = "button";
  node.disabled = disabled;
  node.addEventListener("click", onClick);
  return node;
}

/** Fill a message's body element with its content. */
export function fillBody(body, message) {
  if (message.role === "assistant") {
    body.replaceChildren(renderMarkdown(message.content));
  } else {
    body.textContent = message.content; // what the user typed, exactly as typed
  }
}

/**
 * The element of `message`. `siblings` are its siblings (itself included, oldest first);
 * `on` has switchTo(sibling), edit(message, content), regenerate(message); `busy` disables
 * the actions while an answer streams.
 */
export function renderMessage(message, siblings, on, busy) {
  const article = el("article", `message ${message.role}`);
  article.dataset.id = message.id;
  article.dataset.status = message.status;

  const meta = el("div", "message-meta");
  meta.append(el("span", "author", message.role === "user" ? "You" : message.model || "assistant"));
  if (message.status === "streaming") meta.append(el("span", "status", "writing…"));
  article.append(meta);

  const body = el("div", "message-body");
  fillBody(body, message);
  article.append(body);

  const notes = [];
  if (message.truncated) {
    notes.push("The oldest messages were left out of this answer's prompt to fit the model's context.");
  }
  if (STATUS_NOTES[message.status]) notes.push(STATUS_NOTES[message.status]);
  if (message.error) notes.push(message.error);
  for (const note of notes) article.append(el("p", "message-note", note));

  const actions = el("div", "message-actions");
  if (siblings.length > 1) {
    const index = siblings.findIndex((m) => m.id === message.id);
    const switcher = el("span", "siblings");
    switcher.append(
      button("<", "icon previous", () => on.switchTo(siblings[index - 1]), busy || index === 0),
      el("span", "position", `${index + 1}/${siblings.length}`),
      button(">", "icon next", () => on.switchTo(siblings[index + 1]), busy || index === siblings.length - 1),
    );
    actions.append(switcher);
  }
  actions.append(copyButton(() => message.content));
  if (message.role === "user") {
    actions.append(button("Edit", "edit", () => startEdit(article, body, message, on), busy));
  } else {
    actions.append(button("Regenerate", "regenerate", () => on.regenerate(message), busy));
  }
  article.append(actions);
  return article;
}

function startEdit(article, body, message, on) {
  const editor = el("div", "editor");
  const area = el("textarea");
  area.value = message.content;
  area.rows = Math.min(12, Math.max(2, message.content.split("\n").length));
  const send = button("Send", "save-edit", () => {
    if (area.value.trim()) on.edit(message, area.value);
  }, false);
  const cancel = button("Cancel", "cancel-edit", () => editor.replaceWith(body), false);
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send.click();
    } else if (event.key === "Escape") {
      cancel.click();
    }
  });
  editor.append(area, el("div", "editor-buttons"));
  editor.lastChild.append(cancel, send);
  body.replaceWith(editor);
  area.focus();
  article.classList.add("editing");
}
