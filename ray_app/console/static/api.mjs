// The console speaks the server's own API, same origin: its keys, limits and errors apply unchanged.
const KEY = "ray_app_key";
const at = location.pathname.indexOf("/ui");
export const ROOT = at > 0 ? location.pathname.slice(0, at) : "";  // the app's route prefix

export class APIError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

export const getKey = () => sessionStorage.getItem(KEY) || "";
export const setKey = (key) => (key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY));

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

async function parse(response) {
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { error: { message: text.slice(0, 500) } }; }
  if (!response.ok) throw new APIError(response.status, body);
  return body;
}

export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, signal, headers: headers(json !== undefined ? { "content-type": "application/json" } : {}) };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form) init.body = form;
  return parse(await fetch(ROOT + path, init));
}

// A streamed chat completion: yields {headers} once, then each parsed chunk, until [DONE].
export async function* streamChat(body, signal) {
  const response = await fetch(ROOT + "/v1/chat/completions", {
    method: "POST", signal, headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) await parse(response);  // throws the API's error
  yield { headers: response.headers };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(chunk.error.status || 500, chunk);
        yield { chunk };
      }
    }
  }
}

// One file up, with upload progress (fetch cannot report it); resolves with the API's JSON.
export function upload(collection, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${ROOT}/v1/collections/${encodeURIComponent(collection)}/documents`);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new APIError(0, { error: { message: "the upload did not reach the server" } }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = { error: { message: xhr.responseText } }; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body); else reject(new APIError(xhr.status, body));
    };
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}
