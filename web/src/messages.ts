// One message of the branch shown: its text (Markdown for answers, plain text for what the
// user typed), who wrote it, its status, and its actions: the `< 2/3 >` sibling switcher,
// Copy, Edit (user messages) and Regenerate (answers).

import { el } from "./dom";
import { copyButton, renderMarkdown } from "./markdown";
import type { Message } from "./types";

const STATUS_NOTES: Partial<Record<Message["status"], string>> = {
  stopped: "Stopped.",
  interrupted: "Interrupted: the server stopped while writing this answer.",
  error: "The answer failed.",
};

export interface MessageActions {
  switchTo(sibling: Message): void;
  edit(message: Message, content: string): void;
  regenerate(message: Message): void;
}

function button(
  label: string,
  className: string,
  onClick: () => void,
  disabled: boolean,
): HTMLButtonElement {
  const node = el("button", className, label);
  node.type = "button";
  node.disabled = disabled;
  node.addEventListener("click", onClick);
  return node;
}

/** Fill a message's body element with its content. */
export function fillBody(body: HTMLElement, message: Pick<Message, "role" | "content">): void {
  if (message.role === "assistant") {
    body.replaceChildren(renderMarkdown(message.content));
  } else {
    body.textContent = message.content; // what the user typed, exactly as typed
  }
}

/**
 * The element of `message`. `siblings` are its siblings (itself included, oldest first);
 * `busy` disables the actions while an answer streams.
 */
export function renderMessage(
  message: Message,
  siblings: Message[],
  on: MessageActions,
  busy: boolean,
): HTMLElement {
  const article = el("article", `message ${message.role}`);
  article.dataset.id = message.id;
  article.dataset.status = message.status;

  const meta = el("div", "message-meta");
  const author = message.role === "user" ? "You" : message.model || "assistant";
  meta.append(el("span", "author", author));
  if (message.status === "streaming") meta.append(el("span", "status", "writing…"));
  article.append(meta);

  const body = el("div", "message-body");
  fillBody(body, message);
  article.append(body);

  const notes: string[] = [];
  if (message.truncated) {
    notes.push(
      "The oldest messages were left out of this answer's prompt to fit the model's context.",
    );
  }
  const statusNote = STATUS_NOTES[message.status];
  if (statusNote) notes.push(statusNote);
  if (message.error) notes.push(message.error);
  for (const note of notes) article.append(el("p", "message-note", note));

  const actions = el("div", "message-actions");
  if (siblings.length > 1) {
    const index = siblings.findIndex((m) => m.id === message.id);
    const last = siblings.length - 1;
    const switcher = el("span", "siblings");
    switcher.append(
      button("<", "icon previous", () => on.switchTo(siblings[index - 1]!), busy || index === 0),
      el("span", "position", `${index + 1}/${siblings.length}`),
      button(">", "icon next", () => on.switchTo(siblings[index + 1]!), busy || index === last),
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

function startEdit(
  article: HTMLElement,
  body: HTMLElement,
  message: Message,
  on: MessageActions,
): void {
  const editor = el("div", "editor");
  const area = el("textarea");
  area.value = message.content;
  area.rows = Math.min(12, Math.max(2, message.content.split("\n").length));
  const send = button(
    "Send",
    "save-edit",
    () => {
      if (area.value.trim()) on.edit(message, area.value);
    },
    false,
  );
  const cancel = button("Cancel", "cancel-edit", () => editor.replaceWith(body), false);
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send.click();
    } else if (event.key === "Escape") {
      cancel.click();
    }
  });
  const buttons = el("div", "editor-buttons");
  buttons.append(cancel, send);
  editor.append(area, buttons);
  body.replaceWith(editor);
  area.focus();
  article.classList.add("editing");
}
