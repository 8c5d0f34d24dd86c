// The chat page. It speaks the Realtime protocol at /v1/realtime like any other client, and reads the
// conversation list and a conversation's history from /v1/conversations. The conversation it shows is the
// one named in the URL's hash (#conv_...), so a reload, a bookmark or a second tab finds it again.
// Text from the server is only ever set as text (textContent), never parsed as HTML.
"use strict";

const KEY_STORAGE = "assistant.key";
const PAGE_SIZE = 20;
const $ = (id) => document.getElementById(id);

const state = {
  socket: null,
  conversationId: null, // the socket's conversation; in the hash once it is stored (its first message)
  isStored: false,
  awaitingItem: null, // the user message sent but not yet stored: response.create waits for it
  isResponding: false, // from response.create until response.done
  answer: null, // the assistant message being streamed into
  attachments: [], // {name, url} data URLs for the next message
  retries: 0,
  lastEventId: null, // of the last server event: where a dropped connection's answer resumes
  resumeFrom: null, // set while reconnecting in the middle of an answer (sent as ?last_event_id=)
  olderAfter: null, // the conversation list's next page
};

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function getJSON(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const error = new Error(body.error?.message || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

function setStatus(text) {
  $("status").textContent = text;
}

function updateControls() {
  const isOpen = state.socket?.readyState === WebSocket.OPEN;
  $("send").disabled = !isOpen || state.isResponding || state.awaitingItem !== null;
  $("stop").disabled = !isOpen || !state.isResponding;
}

// ---------------------------------------------------------------- the transcript

function addMessage(role, content) {
  const li = document.createElement("li");
  li.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : role;
  li.append(who);
  let imageNumber = 0;
  for (const part of content) {
    if (part.type !== "input_image") continue;
    if (part.image_url) {
      const img = document.createElement("img");
      img.src = part.image_url;
      img.alt = `Image ${++imageNumber}`;
      li.append(img);
    } else {
      addNote(li, `Image ${++imageNumber}`);
    }
  }
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = content.filter((p) => "text" in p).map((p) => p.text).join("\n");
  li.append(text);
  $("transcript").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function addNote(li, text, kind = "note") {
  const note = document.createElement("p");
  note.className = kind;
  note.textContent = text;
  if (kind === "error") note.setAttribute("role", "alert");
  if (!li) {
    li = document.createElement("li");
    li.className = "notice";
    $("transcript").append(li);
  }
  li.append(note);
  li.scrollIntoView({ block: "end" });
}

function clearTranscript() {
  $("transcript").replaceChildren();
  state.answer = null;
}

async function loadHistory(conversationId) {
  let after = null;
  do {
    const query = new URLSearchParams({ order: "asc", limit: "100" });
    if (after) query.set("after", after);
    const page = await getJSON(`/v1/conversations/${encodeURIComponent(conversationId)}/items?${query}`);
    if (state.conversationId !== conversationId) return; // another conversation was chosen meanwhile
    for (const item of page.data) {
      if (item.type === "message") addMessage(item.role, item.content || []);
    }
    after = page.has_more ? page.last_id : null;
  } while (after);
}

// ---------------------------------------------------------------- the conversation list

async function loadConversations({ older = false } = {}) {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (older && state.olderAfter) query.set("after", state.olderAfter);
  const note = $("conversations-note");
  try {
    const page = await getJSON(`/v1/conversations?${query}`);
    if (!older) $("conversations").replaceChildren();
    for (const conversation of page.data) $("conversations").append(conversationEntry(conversation));
    state.olderAfter = page.has_more ? page.last_id : null;
    $("more-conversations").hidden = !page.has_more;
    note.textContent = $("conversations").children.length ? "" : "No conversations yet.";
    markCurrentConversation();
  } catch (error) {
    note.textContent = error.status === 401 ? "Enter an API key to see your conversations."
      : `The conversation list is unavailable: ${error.message}`;
  }
}

function conversationEntry(conversation) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  link.href = `#${conversation.id}`;
  link.dataset.id = conversation.id;
  const when = conversation.created_at
    ? new Date(conversation.created_at * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" })
    : "";
  link.textContent = conversation.metadata?.title || when || conversation.id;
  link.title = conversation.id;
  li.append(link);
  return li;
}

function markCurrentConversation() {
  for (const link of $("conversations").querySelectorAll("a")) {
    if (link.dataset.id === state.conversationId) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// ---------------------------------------------------------------- the socket

function connect() {
  const url = new URL("/v1/realtime", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (state.isStored) url.searchParams.set("conversation", state.conversationId);
  if (state.isStored && state.resumeFrom) url.searchParams.set("last_event_id", state.resumeFrom);
  // Browsers cannot set headers on a WebSocket: the key travels as a subprotocol, the server answers "realtime".
  const protocols = ["realtime"];
  if (apiKey()) protocols.push(`openai-insecure-api-key.${apiKey()}`);
  const socket = new WebSocket(url, protocols);
  state.socket = socket;
  setStatus("Connecting…");
  socket.onopen = () => {
    socket.wasOpen = true;
    state.retries = 0;
  };
  socket.onmessage = (message) => {
    if (state.socket === socket) handleEvent(JSON.parse(message.data));
  };
  socket.onclose = (event) => {
    if (state.socket === socket) onClosed(event, socket.wasOpen);
  };
}

function disconnect() {
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close(1000);
}

async function onClosed(event, wasOpen) {
  // An answer that was streaming runs on at the server: the next connection picks it up after the last event seen.
  if (state.isResponding && state.isStored && event.code !== 1008) state.resumeFrom ??= state.lastEventId;
  else endResponse();
  state.awaitingItem = null;
  updateControls();
  if (event.code === 1008) return; // policy: the conversation is unknown; the error event said so
  if (!wasOpen) {
    // A refused handshake shows the page nothing but a closed socket: ask the HTTP API why.
    const response = await fetch("/v1/models", { headers: authHeaders() }).catch(() => null);
    if (response?.status === 401) {
      endResponse();
      setStatus(apiKey() ? "The server refused this API key." : "This server needs an API key.");
      $("key-box").open = true;
      return;
    }
  }
  const delay = Math.min(1000 * 2 ** state.retries++, 15000);
  setStatus(`Disconnected; trying again in ${Math.round(delay / 1000)} s…`);
  setTimeout(() => {
    if (state.socket === null || state.socket.readyState === WebSocket.CLOSED) connect();
  }, delay);
}

function send(event) {
  state.socket.send(JSON.stringify(event));
}

function handleEvent(event) {
  state.lastEventId = event.event_id;
  switch (event.type) {
    case "session.created":
      state.resumeFrom = null; // the server replays what was missed, if anything, right after this
      // A conversation not stored yet is the server's new one (also after a reconnect); a stored one continues.
      if (!state.isStored) state.conversationId = event.session.conversation_id;
      setStatus("Ready.");
      break;
    case "conversation.item.added":
      if (event.item.role === "user" && state.awaitingItem) {
        state.awaitingItem = null;
        rememberConversation();
        send({ type: "response.create" });
        state.isResponding = true;
      }
      break;
    case "response.created":
      state.answer = addMessage("assistant", []);
      state.answer.setAttribute("aria-busy", "true");
      setStatus("Answering…");
      break;
    case "response.output_text.delta":
      state.answer?.querySelector(".text").append(event.delta);
      break;
    case "response.done":
      endResponse(event.response);
      setStatus("Ready.");
      break;
    case "error":
      onError(event.error);
      break;
  }
  updateControls();
}

function endResponse(response) {
  const answer = state.answer;
  state.isResponding = false;
  state.answer = null;
  if (!answer) return;
  answer.removeAttribute("aria-busy");
  if (!response) addNote(answer, "Interrupted: the connection closed.", "error");
  else if (response.status === "cancelled") addNote(answer, "Stopped.");
  else if (response.status === "incomplete") addNote(answer, "Cut short at the token limit.");
  else if (response.status === "failed") {
    addNote(answer, response.status_details?.error?.message || "The response failed.", "error");
  }
}

function onError(error) {
  if (error.code === "replay_unavailable") { // the answer's end cannot be replayed: the stored history has it
    endResponse();
    addNote(null, "Part of the answer was missed while disconnected; open the conversation again to see it whole.");
    return;
  }
  if (error.code === "conversation_not_found") {
    addNote(null, "This conversation is not stored here (or belongs to another key).", "error");
    startConversation(null);
    return;
  }
  if (state.awaitingItem) { // the message was refused (an image too large...): nothing was stored
    addNote(state.awaitingItem, `Not sent: ${error.message}`, "error");
    state.awaitingItem = null;
    return;
  }
  if (state.isResponding && !state.answer) state.isResponding = false; // response.create was refused
  addNote(null, error.message, "error");
}

function rememberConversation() {
  if (state.isStored) return;
  state.isStored = true;
  history.replaceState(null, "", `#${state.conversationId}`);
  loadConversations();
}

// ---------------------------------------------------------------- choosing a conversation

async function startConversation(conversationId) {
  disconnect();
  clearTranscript();
  state.conversationId = conversationId;
  state.isStored = Boolean(conversationId);
  state.awaitingItem = null;
  state.resumeFrom = null;
  if (!conversationId && location.hash) history.replaceState(null, "", location.pathname + location.search);
  markCurrentConversation();
  updateControls();
  if (conversationId) {
    try {
      await loadHistory(conversationId);
    } catch (error) {
      if (error.status === 404) {
        addNote(null, "This conversation is not stored here (or belongs to another key).", "error");
        return startConversation(null);
      }
      addNote(null, `The history could not be loaded: ${error.message}`, "error");
    }
    if (state.conversationId !== conversationId) return;
  }
  connect();
}

// ---------------------------------------------------------------- the composer

function sendMessage() {
  const text = $("prompt").value.trim();
  if ((!text && !state.attachments.length) || $("send").disabled) return;
  const content = state.attachments.map((image) => ({ type: "input_image", image_url: image.url }));
  if (text) content.push({ type: "input_text", text });
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
  state.awaitingItem = addMessage("user", content);
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  updateControls();
}

function stopResponse() {
  if (!state.isResponding) return;
  send({ type: "response.cancel" });
  $("stop").disabled = true;
}

function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      setStatus(`${file.name} is not an image.`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.attachments.push({ name: file.name || "pasted image", url: reader.result });
      renderAttachments();
    };
    reader.readAsDataURL(file);
  }
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  state.attachments.forEach((image, index) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.onclick = () => {
      state.attachments.splice(index, 1);
      renderAttachments();
      $("prompt").focus();
    };
    li.append(img, remove);
    list.append(li);
  });
}

function hasFiles(event) {
  return [...(event.dataTransfer?.types || [])].includes("Files");
}

function wireControls() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    } else if (event.key === "Escape") {
      stopResponse();
    }
  });
  $("prompt").addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) {
      event.preventDefault();
      attachFiles(files);
    }
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    document.body.classList.add("dropping");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dropping");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dropping");
    if (!hasFiles(event)) return;
    event.preventDefault();
    attachFiles(event.dataTransfer.files);
  });
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    attachFiles($("file").files);
    $("file").value = "";
  });
  $("stop").addEventListener("click", stopResponse);
  $("new-chat").addEventListener("click", () => {
    startConversation(null);
    $("prompt").focus();
  });
  $("more-conversations").addEventListener("click", () => loadConversations({ older: true }));
  $("key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    $("key-box").open = false;
    loadConversations();
    startConversation(state.isStored ? state.conversationId : null);
  });
  window.addEventListener("hashchange", () => {
    const conversationId = location.hash.slice(1) || null;
    if (conversationId !== state.conversationId) startConversation(conversationId);
  });
}

wireControls();
loadConversations();
startConversation(location.hash.slice(1) || null);
