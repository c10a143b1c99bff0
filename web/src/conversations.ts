// The conversation list, grouped by day (Today, Yesterday, Previous 7 days, then by date),
// and search results in its place while a search is typed.

import { el } from "./dom";
import type { ConversationSummary, SearchHit } from "./types";

const DAY_MS = 24 * 3600 * 1000;

function startOfDay(date: Date): number {
  return new Date(date.getFullYear(), date.getMonth(), date.getDate()).getTime();
}

/** The group a conversation last active at `seconds` (Unix time) is listed under. */
export function dayLabel(seconds: number, now: Date = new Date()): string {
  const day = startOfDay(new Date(seconds * 1000));
  const today = startOfDay(now);
  if (day >= today) return "Today";
  if (day >= today - DAY_MS) return "Yesterday";
  if (day >= today - 7 * DAY_MS) return "Previous 7 days";
  return new Date(seconds * 1000).toLocaleDateString(undefined, {
    year: "numeric",
    month: "long",
    day: "numeric",
  });
}

export interface ConversationActions {
  open(id: string): void;
  rename(conversation: ConversationSummary): void;
  remove(conversation: ConversationSummary): void;
}

/** Fill `container` with `conversations` (newest first). */
export function renderConversations(
  container: HTMLElement,
  conversations: ConversationSummary[],
  currentId: string | undefined,
  on: ConversationActions,
): void {
  container.replaceChildren();
  if (conversations.length === 0) {
    container.append(el("p", "empty", "No conversations yet."));
    return;
  }
  let group: string | null = null;
  let list: HTMLUListElement = el("ul", "conversation-list");
  for (const conversation of conversations) {
    const label = dayLabel(conversation.updated_at);
    if (label !== group) {
      group = label;
      container.append(el("h2", "day", label));
      list = el("ul", "conversation-list");
      container.append(list);
    }
    const item = el("li", "conversation");
    item.dataset.id = conversation.id;
    if (conversation.id === currentId) item.classList.add("current");
    const open = el("button", "conversation-title", conversation.title);
    open.type = "button";
    open.title = conversation.title;
    open.addEventListener("click", () => on.open(conversation.id));
    const rename = el("button", "icon rename", "\u270E");
    rename.type = "button";
    rename.setAttribute("aria-label", `Rename ${conversation.title}`);
    rename.addEventListener("click", () => on.rename(conversation));
    const remove = el("button", "icon delete", "\u00D7");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    remove.addEventListener("click", () => on.remove(conversation));
    item.append(open, rename, remove);
    list.append(item);
  }
}

/** Fill `container` with search `hits`; `open(conversationId, messageId)` shows one. */
export function renderSearchResults(
  container: HTMLElement,
  hits: SearchHit[],
  open: (conversationId: string, messageId: string) => void,
): void {
  container.replaceChildren();
  if (hits.length === 0) {
    container.append(el("p", "empty", "Nothing found."));
    return;
  }
  const list = el("ul", "conversation-list search-results");
  for (const hit of hits) {
    const item = el("li", "conversation");
    const button = el("button", "conversation-title");
    button.type = "button";
    button.append(el("strong", null, hit.conversation_title), el("span", "snippet", hit.snippet));
    button.addEventListener("click", () => open(hit.conversation_id, hit.message_id));
    item.append(button);
    list.append(item);
  }
  container.append(list);
}
