// The web chat: talks to the server only through its OpenAI API
// (GET /v1/models, POST /v1/chat/completions streamed as server-sent events).
// Every text from the model or the server goes into the page as text
// (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), log: $("log"), error: $("error"), status: $("status"),
  form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), system: $("system"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), apiKey: $("api-key"), settings: $("settings"),
};

let modelId = null;   // the server's one model, from GET /v1/models
let messages = [];    // the conversation: {role, content}, system prompt excluded
let controller = null; // the reply being streamed, if any

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = !text;
}

// The message of an OpenAI-style JSON error body, else the HTTP status.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

function askForKey(message) {
  ui.settings.open = true;
  showError(message + " Enter the server's API key in Settings, then try again.");
  ui.apiKey.focus();
}

function addMessage(role, content) {
  const item = document.createElement("li");
  item.className = "message " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : modelId || "Assistant";
  const text = document.createElement("div");
  text.className = "content";
  text.textContent = content;
  item.append(who, text);
  ui.log.append(item);
  item.scrollIntoView({ block: "end" });
  return text;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    ui.model.textContent = "The server cannot be reached.";
    return false;
  }
  if (response.status === 401) {
    ui.model.textContent = "The server asks for an API key.";
    askForKey(await errorOf(response));
    return false;
  }
  if (!response.ok) {
    showError(await errorOf(response));
    return false;
  }
  const card = (await response.json()).data[0];
  modelId = card.id;
  const context = card.context_length; // jaxgpt's field: the model's tokens
  ui.model.textContent = `Model: ${card.id}` + (context ? ` · context ${context} tokens` : "")
    + (card.chat_template === false ? " · no chat template: replies continue the text" : "");
  if (context) ui.maxTokens.max = String(context);
  if (card.system_prompt && !ui.system.value) ui.system.value = card.system_prompt;
  showError("");
  return true;
}

function requestBody() {
  const system = ui.system.value.trim();
  const body = {
    model: modelId,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    stream: true,
  };
  // An empty field leaves the knob to the server's flags.
  const temperature = parseFloat(ui.temperature.value);
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// Reads the server-sent events of a streamed reply: each `data:` line is one
// chat.completion.chunk, and `data: [DONE]` ends the stream.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

async function send(text) {
  if (controller) return;
  if (!modelId && !(await loadModel())) return;
  showError("");
  const chat = messages; // New chat replaces the array: a late reply lands nowhere
  chat.push({ role: "user", content: text });
  const asked = addMessage("user", text).parentElement;
  const view = addMessage("assistant", "");
  const answer = view.parentElement;
  answer.classList.add("streaming");
  answer.setAttribute("aria-busy", "true"); // Screen readers read it once, whole.
  let reply = "";
  let ended = "";
  let answered = false; // The stream ran to its end.
  controller = new AbortController();
  setBusy(true);
  ui.status.textContent = "Writing…";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (response.status === 401) askForKey(await errorOf(response));
    else if (!response.ok) showError(await errorOf(response));
    else {
      const finish = await readStream(response, (piece) => {
        reply += piece;
        view.textContent = reply.trimStart(); // A base model's reply starts on a new line.
        answer.scrollIntoView({ block: "end" });
      });
      answered = true;
      if (finish === "length") ended = "The reply reached the token limit.";
      else if (!reply) ended = "The model's reply was empty.";
    }
  } catch (e) {
    if (e.name === "AbortError") ended = "Stopped.";
    else showError(e.message || String(e));
  } finally {
    answer.classList.remove("streaming");
    answer.removeAttribute("aria-busy");
    controller = null;
    setBusy(false);
    if (chat === messages) ui.status.textContent = ended;
  }
  if (answered || reply) {
    chat.push({ role: "assistant", content: reply });
  } else {
    // Refused, failed or stopped before a word: take the turn out, and give
    // its text back to edit.
    chat.pop();
    asked.remove();
    answer.remove();
    if (chat === messages && !ui.prompt.value) ui.prompt.value = text;
  }
}

function newChat() {
  if (controller) controller.abort();
  messages = [];
  ui.log.replaceChildren();
  ui.status.textContent = "";
  showError("");
  ui.prompt.focus();
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => controller && controller.abort());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller) controller.abort();
});
ui.newChat.addEventListener("click", newChat);
ui.apiKey.addEventListener("change", () => { if (!modelId) loadModel(); });

loadModel();
