// The chat page: wires the conversation list, the messages of the branch shown, the composer
// (send, stop), the settings dialog and the model picker to kiln's chat API.

// KaTeX's stylesheet (and, through it, its fonts): bundled into app.css, served by kiln.
import "katex/dist/katex.css";

import { download, getJson, sendJson, streamEvents } from "./api";
import { renderConversations, renderSearchResults } from "./conversations";
import { byId } from "./dom";
import { fillBody, renderMessage } from "./messages";
import { ModelPicker } from "./models";
import { SettingsDialog } from "./settings";
import type { SettingsChanges } from "./settings";
import { MessageTree } from "./tree";
import { messageOf } from "./types";
import type {
  AnswerEvent,
  Conversation,
  ConversationSummary,
  Defaults,
  Message,
  SearchHit,
} from "./types";

const API = "/api/chat";
const $ = byId;

/** A conversation shown: what the API answered, with `tree` (all of its messages). */
interface OpenConversation extends Conversation {
  tree: MessageTree;
}

/** The answer being written. */
interface Streaming {
  assistant: Message | null;
  text: string;
  controller: AbortController;
}

const state: {
  conversations: ConversationSummary[];
  current: OpenConversation | null;
  /** What a conversation gets when it sets nothing. */
  defaults: Defaults | null;
  streaming: Streaming | null;
} = {
  conversations: [],
  current: null,
  defaults: null,
  streaming: null,
};

function opened(conversation: Conversation): OpenConversation {
  return { ...conversation, tree: new MessageTree(conversation.messages) };
}

// --- notices --------------------------------------------------------------------------------

let noticeTimer: ReturnType<typeof setTimeout> | undefined;

function showNotice(message: string): void {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (notice.hidden = true), 8000);
}

function noticeOf(error: unknown): void {
  showNotice(messageOf(error));
}

// --- conversation list ----------------------------------------------------------------------

async function refreshList(): Promise<void> {
  state.conversations = await getJson<ConversationSummary[]>(`${API}/conversations`);
  if ($<HTMLInputElement>("search").value.trim()) return; // the search results stay shown
  renderConversations($("conversations"), state.conversations, state.current?.id, {
    open: (id) => void openConversation(id),
    rename: (conversation) => void renameConversation(conversation),
    remove: (conversation) => void deleteConversation(conversation),
  });
}

async function renameConversation(conversation: ConversationSummary): Promise<void> {
  const title = window.prompt("Rename the conversation:", conversation.title);
  if (title === null) return;
  try {
    await sendJson("PATCH", `${API}/conversations/${conversation.id}`, { title });
  } catch (error) {
    noticeOf(error);
  }
  if (state.current?.id === conversation.id) await openConversation(conversation.id);
  await refreshList();
}

async function deleteConversation(conversation: ConversationSummary): Promise<void> {
  if (!window.confirm(`Delete "${conversation.title}"?`)) return;
  try {
    await sendJson("DELETE", `${API}/conversations/${conversation.id}`);
  } catch (error) {
    noticeOf(error);
  }
  if (state.current?.id === conversation.id) newChat();
  await refreshList();
}

let searchTimer: ReturnType<typeof setTimeout> | undefined;

function onSearchInput(): void {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const query = $<HTMLInputElement>("search").value.trim();
    if (!query) {
      await refreshList();
      return;
    }
    try {
      const hits = await getJson<SearchHit[]>(`${API}/search?q=${encodeURIComponent(query)}`);
      renderSearchResults($("conversations"), hits, (conversationId, messageId) =>
        void openConversation(conversationId, messageId),
      );
    } catch (error) {
      noticeOf(error);
    }
  }, 250);
}

// --- the conversation shown -----------------------------------------------------------------

function newChat(): void {
  if (state.streaming) return;
  state.current = null;
  $("chat-title").textContent = "New chat";
  renderMessages();
  refreshList().catch(noticeOf);
  closeSidebarOnPhone();
  $("input").focus();
}

/** Show a conversation; with `messageId`, the branch through that message. */
async function openConversation(id: string, messageId?: string): Promise<void> {
  if (state.streaming) return;
  let conversation: OpenConversation;
  try {
    conversation = opened(await getJson<Conversation>(`${API}/conversations/${id}`));
  } catch (error) {
    noticeOf(error);
    return;
  }
  state.current = conversation;
  if (messageId && conversation.tree.get(messageId)) {
    await selectLeaf(conversation.tree.latestLeaf(messageId));
  }
  $("chat-title").textContent = conversation.title;
  renderMessages();
  await refreshList();
  closeSidebarOnPhone();
}

async function selectLeaf(leafId: string): Promise<void> {
  const conversation = state.current;
  if (!conversation) return;
  conversation.current_leaf_id = leafId;
  renderMessages();
  try {
    await sendJson("PATCH", `${API}/conversations/${conversation.id}`, { current_leaf_id: leafId });
  } catch (error) {
    noticeOf(error);
  }
}

function renderMessages(): void {
  const container = $("messages");
  const conversation = state.current;
  const branch = conversation ? conversation.tree.branch(conversation.current_leaf_id) : [];
  if (!conversation || branch.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.id = "empty";
    empty.textContent = "Send a message to start chatting.";
    container.replaceChildren(empty);
    return;
  }
  const handlers = {
    switchTo: (sibling: Message) => void selectLeaf(conversation.tree.latestLeaf(sibling.id)),
    edit: (message: Message, content: string) => void send(content, message.parent_id),
    regenerate: (message: Message) =>
      void runAnswer(`${API}/conversations/${conversation.id}/messages/${message.id}/regenerate`),
  };
  const busy = Boolean(state.streaming);
  container.replaceChildren(
    ...branch.map((m) => renderMessage(m, conversation.tree.siblings(m), handlers, busy)),
  );
  container.scrollTop = container.scrollHeight;
}

// --- answers --------------------------------------------------------------------------------

function setBusy(busy: boolean): void {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

/** Send `content` as a user message after `parentId` (undefined: after the branch shown). */
async function send(content: string, parentId?: string | null): Promise<void> {
  if (state.streaming || !content.trim()) return;
  if (!state.current) {
    const title = content.trim().split("\n")[0]!.slice(0, 60);
    try {
      const created = await sendJson<Conversation>("POST", `${API}/conversations`, { title });
      state.current = opened(created);
      $("chat-title").textContent = state.current.title;
    } catch (error) {
      noticeOf(error);
      return;
    }
  }
  const body = parentId === undefined ? { content } : { content, parent_id: parentId };
  await runAnswer(`${API}/conversations/${state.current.id}/messages`, body);
}

let paintPending = false;

function paintStreaming(): void {
  if (paintPending) return;
  paintPending = true;
  requestAnimationFrame(() => {
    paintPending = false;
    const streaming = state.streaming;
    if (!streaming?.assistant) return;
    const article = document.querySelector(`article[data-id="${streaming.assistant.id}"]`);
    const body = article?.querySelector<HTMLElement>(".message-body");
    if (!body) return;
    const container = $("messages");
    const atBottom = container.scrollHeight - container.scrollTop - container.clientHeight < 80;
    fillBody(body, { role: streaming.assistant.role, content: streaming.text });
    if (atBottom) container.scrollTop = container.scrollHeight;
  });
}

function onAnswerEvent(event: AnswerEvent): void {
  const conversation = state.current;
  const streaming = state.streaming;
  if (!conversation || !streaming) return;
  if (event.type === "start") {
    if (event.user) conversation.tree.add(event.user);
    conversation.tree.add(event.assistant);
    conversation.current_leaf_id = event.assistant.id;
    streaming.assistant = event.assistant;
    renderMessages();
    refreshList().catch(() => {}); // a new conversation (or its new title) shows at once
  } else if (event.type === "delta") {
    streaming.text += event.text;
    paintStreaming();
  } else if (event.type === "end") {
    const stored = conversation.tree.get(event.message.id);
    if (stored) Object.assign(stored, event.message);
  } else if (event.type === "error") {
    showNotice(event.error);
  }
}

async function runAnswer(path: string, body?: unknown): Promise<void> {
  if (state.streaming || !state.current) return;
  const conversationId = state.current.id;
  const streaming: Streaming = { assistant: null, text: "", controller: new AbortController() };
  state.streaming = streaming;
  setBusy(true);
  renderMessages();
  try {
    await streamEvents<AnswerEvent>(path, body, onAnswerEvent, streaming.controller.signal);
  } catch (error) {
    if (!(error instanceof Error && error.name === "AbortError")) noticeOf(error);
  } finally {
    state.streaming = null;
  }
  try {
    // The stored conversation is the truth (final statuses, the branch shown).
    if (state.current?.id === conversationId) await openConversation(conversationId);
    else await refreshList();
  } finally {
    setBusy(false); // only now: what is shown is final
  }
  $("input").focus();
}

async function stop(): Promise<void> {
  const streaming = state.streaming;
  if (!streaming || !state.current) return;
  if (!streaming.assistant) {
    streaming.controller.abort(); // not started yet: leaving aborts it on the server
    return;
  }
  try {
    await sendJson(
      "POST",
      `${API}/conversations/${state.current.id}/messages/${streaming.assistant.id}/stop`,
    );
  } catch {
    streaming.controller.abort(); // the answer may have just ended; leaving stops it anyway
  }
}

// --- settings, models -----------------------------------------------------------------------

async function loadDefaults(): Promise<void> {
  try {
    state.defaults = await getJson<Defaults>(`${API}/defaults`);
  } catch {
    state.defaults = null;
  }
}

async function saveSettings(changes: SettingsChanges): Promise<void> {
  let id = state.current?.id;
  if (!id) {
    const created = opened(await sendJson<Conversation>("POST", `${API}/conversations`, changes));
    state.current = created;
    id = created.id;
  } else {
    await sendJson("PATCH", `${API}/conversations/${id}`, changes);
  }
  await openConversation(id);
}

// --- export, import -------------------------------------------------------------------------

async function exportCurrent(format: "json" | "markdown"): Promise<void> {
  $<HTMLDetailsElement>("export-menu").open = false;
  if (!state.current) {
    showNotice("Nothing to export yet: open a conversation first.");
    return;
  }
  try {
    await download(
      `${API}/conversations/${state.current.id}/export?format=${format}`,
      format === "markdown" ? "kiln-chat.md" : "kiln-chat.json",
    );
  } catch (error) {
    noticeOf(error);
  }
}

async function exportAll(): Promise<void> {
  try {
    await download(`${API}/export`, "kiln-chats.json");
  } catch (error) {
    noticeOf(error);
  }
}

/** Import the JSON export chosen in the file picker; shows the first conversation it made. */
async function importFile(input: HTMLInputElement): Promise<void> {
  const file = input.files?.[0];
  input.value = ""; // choosing the same file again is a new import
  if (!file || state.streaming) return;
  let exported: unknown;
  try {
    exported = JSON.parse(await file.text());
  } catch {
    showNotice(`${file.name} is not a JSON file: import takes a kiln JSON export.`);
    return;
  }
  try {
    const { conversations } = await sendJson<{ conversations: ConversationSummary[] }>(
      "POST",
      `${API}/import`,
      exported,
    );
    const count = conversations.length;
    showNotice(`Imported ${count} conversation${count === 1 ? "" : "s"} from ${file.name}.`);
    const first = conversations[0];
    if (first) await openConversation(first.id);
  } catch (error) {
    showNotice(`Import failed: ${messageOf(error)}`);
  }
}

// --- layout, theme, keys --------------------------------------------------------------------

function closeSidebarOnPhone(): void {
  document.body.classList.remove("sidebar-open");
}

function applyTheme(theme: string | null): void {
  if (theme) document.documentElement.dataset.theme = theme;
}

function toggleTheme(): void {
  const current =
    document.documentElement.dataset.theme ||
    (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  const next = current === "dark" ? "light" : "dark";
  localStorage.setItem("kiln.theme", next);
  applyTheme(next);
}

function onKey(event: KeyboardEvent): void {
  if (event.ctrlKey && event.shiftKey && event.key.toLowerCase() === "o") {
    event.preventDefault();
    newChat();
  } else if (event.shiftKey && event.key === "Escape") {
    event.preventDefault();
    $("input").focus();
  } else if (event.key === "Escape" && state.streaming) {
    event.preventDefault();
    void stop();
  }
}

function main(): void {
  applyTheme(localStorage.getItem("kiln.theme"));
  const settings = new SettingsDialog($<HTMLDialogElement>("settings"), saveSettings);
  const picker = new ModelPicker(
    $<HTMLSelectElement>("model-select"),
    $<HTMLButtonElement>("activate"),
    $("model-status"),
    () => void loadDefaults(),
  );
  const input = $<HTMLTextAreaElement>("input");
  const composer = $<HTMLFormElement>("composer");

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const content = input.value;
    if (!content.trim() || state.streaming) return;
    input.value = "";
    void send(content);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => void stop());
  $("new-chat").addEventListener("click", newChat);
  $("search").addEventListener("input", onSearchInput);
  $("open-settings").addEventListener("click", () =>
    settings.open(state.current, state.defaults?.settings),
  );
  $("theme").addEventListener("click", toggleTheme);
  $("export-json").addEventListener("click", () => void exportCurrent("json"));
  $("export-markdown").addEventListener("click", () => void exportCurrent("markdown"));
  $("export-all").addEventListener("click", () => void exportAll());
  $("import").addEventListener("click", () => $("import-file").click());
  const importInput = $<HTMLInputElement>("import-file");
  importInput.addEventListener("change", () => void importFile(importInput));
  document.addEventListener("click", (event) => {
    const menu = $<HTMLDetailsElement>("export-menu");
    // A click elsewhere closes the menu.
    if (menu.open && !menu.contains(event.target as Node | null)) menu.open = false;
  });
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", closeSidebarOnPhone);
  document.addEventListener("keydown", onKey);

  refreshList().catch(noticeOf);
  void picker.refresh();
  void loadDefaults();
  document.body.dataset.ready = "true";
  input.focus();
}

main();
