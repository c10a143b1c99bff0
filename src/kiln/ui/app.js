// The chat page: wires the conversation list, the messages of the branch shown, the composer
// (send, stop), the settings dialog and the model picker to kiln's chat API.

import { download, getJson, sendJson, streamEvents } from "./api.js";
import { renderConversations, renderSearchResults } from "./conversations.js";
import { fillBody, renderMessage } from "./messages.js";
import { ModelPicker } from "./models.js";
import { SettingsDialog } from "./settings.js";
import { MessageTree } from "./tree.js";

const API = "/api/chat";
const $ = (id) => document.getElementById(id);

const state = {
  conversations: [],
  current: null, // the conversation shown, with `tree` (a MessageTree of all its messages)
  defaults: null, // {model, settings}: what a conversation gets when it sets nothing
  streaming: null, // {assistant, text, controller}: the answer being written
};

// --- notices --------------------------------------------------------------------------------

function showNotice(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
  clearTimeout(showNotice.timer);
  showNotice.timer = setTimeout(() => (notice.hidden = true), 8000);
}

// --- conversation list ----------------------------------------------------------------------

async function refreshList() {
  state.conversations = await getJson(`${API}/conversations`);
  if ($("search").value.trim()) return; // the search results stay shown
  renderConversations($("conversations"), state.conversations, state.current?.id, {
    open: (id) => openConversation(id),
    rename: renameConversation,
    remove: deleteConversation,
  });
}

async function renameConversation(conversation) {
  const title = window.prompt("Rename the conversation:", conversation.title);
  if (title === null) return;
  try {
    await sendJson("PATCH", `${API}/conversations/${conversation.id}`, { title });
  } catch (error) {
    showNotice(error.message);
  }
  if (state.current?.id === conversation.id) await openConversation(conversation.id);
  await refreshList();
}

async function deleteConversation(conversation) {
  if (!window.confirm(`Delete "${conversation.title}"?`)) return;
  try {
    await sendJson("DELETE", `${API}/conversations/${conversation.id}`);
  } catch (error) {
    showNotice(error.message);
  }
  if (state.current?.id === conversation.id) newChat();
  await refreshList();
}

let searchTimer = null;
function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const query = $("search").value.trim();
    if (!query) {
      await refreshList();
      return;
    }
    try {
      const hits = await getJson(`${API}/search?q=${encodeURIComponent(query)}`);
      renderSearchResults($("conversations"), hits, (conversationId, messageId) =>
        openConversation(conversationId, messageId),
      );
    } catch (error) {
      showNotice(error.message);
    }
  }, 250);
}

// --- the conversation shown -----------------------------------------------------------------

function newChat() {
  if (state.streaming) return;
  state.current = null;
  $("chat-title").textContent = "New chat";
  renderMessages();
  refreshList().catch((error) => showNotice(error.message));
  closeSidebarOnPhone();
  $("input").focus();
}

/** Show a conversation; with `messageId`, the branch through that message. */
async function openConversation(id, messageId) {
  if (state.streaming) return;
  let conversation;
  try {
    conversation = await getJson(`${API}/conversations/${id}`);
  } catch (error) {
    showNotice(error.message);
    return;
  }
  conversation.tree = new MessageTree(conversation.messages);
  state.current = conversation;
  if (messageId && conversation.tree.get(messageId)) {
    await selectLeaf(conversation.tree.latestLeaf(messageId));
  }
  $("chat-title").textContent = conversation.title;
  renderMessages();
  await refreshList();
  closeSidebarOnPhone();
}

async function selectLeaf(leafId) {
  const conversation = state.current;
  conversation.current_leaf_id = leafId;
  renderMessages();
  try {
    await sendJson("PATCH", `${API}/conversations/${conversation.id}`, { current_leaf_id: leafId });
  } catch (error) {
    showNotice(error.message);
  }
}

function renderMessages() {
  const container = $("messages");
  const conversation = state.current;
  const branch = conversation ? conversation.tree.branch(conversation.current_leaf_id) : [];
  if (branch.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.id = "empty";
    empty.textContent = "Send a message to start chatting.";
    container.replaceChildren(empty);
    return;
  }
  const handlers = {
    switchTo: (sibling) => selectLeaf(conversation.tree.latestLeaf(sibling.id)),
    edit: (message, content) => send(content, message.parent_id),
    regenerate: (message) =>
      runAnswer(`${API}/conversations/${conversation.id}/messages/${message.id}/regenerate`),
  };
  const busy = Boolean(state.streaming);
  container.replaceChildren(
    ...branch.map((m) => renderMessage(m, conversation.tree.siblings(m), handlers, busy)),
  );
  container.scrollTop = container.scrollHeight;
}

// --- answers --------------------------------------------------------------------------------

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

/** Send `content` as a user message after `parentId` (undefined: after the branch shown). */
async function send(content, parentId) {
  if (state.streaming || !content.trim()) return;
  if (!state.current) {
    const title = content.trim().split("\n")[0].slice(0, 60);
    try {
      const created = await sendJson("POST", `${API}/conversations`, { title });
      created.tree = new MessageTree(created.messages);
      state.current = created;
      $("chat-title").textContent = created.title;
    } catch (error) {
      showNotice(error.message);
      return;
    }
  }
  const body = parentId === undefined ? { content } : { content, parent_id: parentId };
  await runAnswer(`${API}/conversations/${state.current.id}/messages`, body);
}

let paintPending = false;
function paintStreaming() {
  if (paintPending) return;
  paintPending = true;
  requestAnimationFrame(() => {
    paintPending = false;
    const streaming = state.streaming;
    if (!streaming?.assistant) return;
    const article = document.querySelector(`article[data-id="${streaming.assistant.id}"]`);
    if (!article) return;
    const container = $("messages");
    const atBottom = container.scrollHeight - container.scrollTop - container.clientHeight < 80;
    fillBody(article.querySelector(".message-body"), { ...streaming.assistant, content: streaming.text });
    if (atBottom) container.scrollTop = container.scrollHeight;
  });
}

function onAnswerEvent(event) {
  const conversation = state.current;
  const streaming = state.streaming;
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
    Object.assign(conversation.tree.get(event.message.id), event.message);
  } else if (event.type === "error") {
    showNotice(event.error);
  }
}

async function runAnswer(path, body) {
  if (state.streaming) return;
  const conversationId = state.current.id;
  state.streaming = { assistant: null, text: "", controller: new AbortController() };
  setBusy(true);
  renderMessages();
  try {
    await streamEvents(path, body, onAnswerEvent, state.streaming.controller.signal);
  } catch (error) {
    if (error.name !== "AbortError") showNotice(error.message);
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

async function stop() {
  const streaming = state.streaming;
  if (!streaming) return;
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

async function loadDefaults() {
  try {
    state.defaults = await getJson(`${API}/defaults`);
  } catch {
    state.defaults = null;
  }
}

async function saveSettings(changes) {
  if (!state.current) {
    const created = await sendJson("POST", `${API}/conversations`, changes);
    created.tree = new MessageTree(created.messages);
    state.current = created;
  } else {
    await sendJson("PATCH", `${API}/conversations/${state.current.id}`, changes);
  }
  await openConversation(state.current.id);
}

// --- export, import -------------------------------------------------------------------------

async function exportCurrent(format) {
  $("export-menu").open = false;
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
    showNotice(error.message);
  }
}

async function exportAll() {
  try {
    await download(`${API}/export`, "kiln-chats.json");
  } catch (error) {
    showNotice(error.message);
  }
}

/** Import the JSON export chosen in the file picker; shows the first conversation it made. */
async function importFile(input) {
  const file = input.files?.[0];
  input.value = ""; // choosing the same file again is a new import
  if (!file || state.streaming) return;
  let document_;
  try {
    document_ = JSON.parse(await file.text());
  } catch {
    showNotice(`${file.name} is not a JSON file: import takes a kiln JSON export.`);
    return;
  }
  try {
    const { conversations } = await sendJson("POST", `${API}/import`, document_);
    const count = conversations.length;
    showNotice(`Imported ${count} conversation${count === 1 ? "" : "s"} from ${file.name}.`);
    await openConversation(conversations[0].id);
  } catch (error) {
    showNotice(`Import failed: ${error.message}`);
  }
}

// --- layout, theme, keys --------------------------------------------------------------------

function closeSidebarOnPhone() {
  document.body.classList.remove("sidebar-open");
}

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
}

function toggleTheme() {
  const current =
    document.documentElement.dataset.theme ||
    (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  const next = current === "dark" ? "light" : "dark";
  localStorage.setItem("kiln.theme", next);
  applyTheme(next);
}

function onKey(event) {
  if (event.ctrlKey && event.shiftKey && event.key.toLowerCase() === "o") {
    event.preventDefault();
    newChat();
  } else if (event.shiftKey && event.key === "Escape") {
    event.preventDefault();
    $("input").focus();
  } else if (event.key === "Escape" && state.streaming) {
    event.preventDefault();
    stop();
  }
}

function main() {
  applyTheme(localStorage.getItem("kiln.theme"));
  const settings = new SettingsDialog($("settings"), saveSettings);
  const picker = new ModelPicker($("model-select"), $("activate"), $("model-status"), loadDefaults);

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("input");
    const content = input.value;
    if (!content.trim() || state.streaming) return;
    input.value = "";
    send(content);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("search").addEventListener("input", onSearchInput);
  $("open-settings").addEventListener("click", () =>
    settings.open(state.current, state.defaults?.settings),
  );
  $("theme").addEventListener("click", toggleTheme);
  $("export-json").addEventListener("click", () => exportCurrent("json"));
  $("export-markdown").addEventListener("click", () => exportCurrent("markdown"));
  $("export-all").addEventListener("click", exportAll);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (event) => importFile(event.target));
  document.addEventListener("click", (event) => {
    const menu = $("export-menu");
    if (menu.open && !menu.contains(event.target)) menu.open = false; // a click elsewhere
  });
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", closeSidebarOnPhone);
  document.addEventListener("keydown", onKey);

  refreshList().catch((error) => showNotice(error.message));
  picker.refresh();
  loadDefaults();
  document.body.dataset.ready = "true";
  $("input").focus();
}

main();
