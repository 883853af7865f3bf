import { useEffect, useState } from "./vendor/preact-hooks.mjs";
import { api, streamChat } from "./api.mjs";
import { ErrorLine, html, usd } from "./ui.mjs";

function RouteInfo({ info }) {
  if (!info || !info.route) return null;
  return html`<p class="route">routed <b>${info.route}</b>${info.cost ? `, ${usd(info.cost)}` : ""}
    <span class="reason">${info.reason}</span></p>`;
}

function Citations({ citations }) {
  if (!citations || !citations.length) return null;
  return html`<ol class="citations" aria-label="Citations">${citations.map((c) => html`
    <li><b>[${c.index}] ${c.title || c.source}</b>${c.page ? `, page ${c.page}` : ""}
      <q>${c.snippet}</q></li>`)}</ol>`;
}

function ToolCalls({ calls }) {
  if (!calls || !calls.length) return null;
  return html`<ul class="tool-calls" aria-label="Tool calls">${calls.map((c) => html`
    <li><code>${c.function.name}(${c.function.arguments})</code></li>`)}</ul>`;
}

function Message({ m }) {
  return html`<article class=${`message ${m.role}`} data-ttft-ms=${m.ttft_ms ?? ""} aria-live=${m.pending ? "polite" : "off"}>
    <h3>${m.role === "user" ? "You" : m.model}</h3>
    <div class="content">${m.content}${m.pending ? html`<span class="cursor" aria-hidden="true">▍</span>` : ""}</div>
    <${ToolCalls} calls=${m.tool_calls} />
    <${Citations} citations=${m.citations} />
    <${RouteInfo} info=${m.route} />
    ${m.usage && html`<p class="usage">${m.usage.prompt_tokens} prompt + ${m.usage.completion_tokens} completion tokens${
      m.ttft_ms != null ? `, first token after ${m.ttft_ms} ms` : ""}</p>`}
    <${ErrorLine} error=${m.error} />
  </article>`;
}

export function Chat() {
  const [models, setModels] = useState([]);
  const [collections, setCollections] = useState([]);
  const [model, setModel] = useState("");
  const [rag, setRag] = useState(false);
  const [collection, setCollection] = useState("");
  const [text, setText] = useState("");
  const [messages, setMessages] = useState([]);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);

  useEffect(() => {
    api("/v1/models").then((r) => {
      const ids = r.data.filter((m) => m.kind !== "embedding").map((m) => m.id);
      setModels(ids);
      setModel((current) => current || ids[0] || "");
    }, setError);
    api("/v1/collections").then((r) => {
      setCollections(r.data.map((c) => c.name));
      setCollection((current) => current || (r.data[0] && r.data[0].name) || "");
    }, () => {});
  }, []);

  const update = (i, patch) => setMessages((all) => all.map((m, j) => (j === i ? { ...m, ...patch } : m)));

  async function send(e) {
    e.preventDefault();
    if (!text.trim() || busy) return;
    const history = [...messages.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content })),
                     { role: "user", content: text }];
    const at = messages.length + 1;
    setMessages((all) => [...all, { role: "user", content: text },
                          { role: "assistant", model, content: "", pending: true }]);
    setText("");
    setBusy(true);
    const started = performance.now();
    let content = "";
    const calls = [];
    try {
      const body = { model, messages: history, max_tokens: 256 };
      if (rag && collection) body.rag = { collection, top_k: 4 };
      for await (const part of streamChat(body)) {
        if (part.headers) {
          const route = part.headers.get("x-ray-app-route");
          update(at, { route: route && { route, reason: part.headers.get("x-ray-app-reason"),
                                         cost: part.headers.get("x-ray-app-cost-usd") } });
          continue;
        }
        const chunk = part.chunk;
        if (chunk.citations) update(at, { citations: chunk.citations });
        if (chunk.usage && !(chunk.choices && chunk.choices.length)) update(at, { usage: chunk.usage });
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (!delta) continue;
        for (const tc of delta.tool_calls || []) {
          calls[tc.index] = calls[tc.index] || { function: { name: "", arguments: "" } };
          if (tc.function?.name) calls[tc.index].function.name += tc.function.name;
          if (tc.function?.arguments) calls[tc.index].function.arguments += tc.function.arguments;
        }
        if (delta.content) {
          if (!content) update(at, { ttft_ms: Math.round(performance.now() - started) });
          content += delta.content;
        }
        update(at, { content, tool_calls: calls.filter(Boolean).map((c) => ({ ...c })) });
      }
      update(at, { pending: false });
    } catch (err) {
      update(at, { pending: false, error: err });
    } finally {
      setBusy(false);
    }
  }

  return html`
    <section class="chat">
      <h2>Chat</h2>
      <${ErrorLine} error=${error} />
      <form class="row" onSubmit=${send}>
        <label>Model, adapter or route
          <select value=${model} onChange=${(e) => setModel(e.target.value)}>
            ${models.map((id) => html`<option value=${id}>${id}</option>`)}
          </select></label>
        <label class="inline"><input type="checkbox" checked=${rag} onChange=${(e) => setRag(e.target.checked)} />
          Answer from documents</label>
        <label>Collection
          <select value=${collection} disabled=${!rag} onChange=${(e) => setCollection(e.target.value)}>
            ${collections.map((c) => html`<option value=${c}>${c}</option>`)}
          </select></label>
      </form>
      <div class="messages">${messages.map((m) => html`<${Message} m=${m} />`)}</div>
      <form class="compose" onSubmit=${send}>
        <label for="prompt">Message</label>
        <textarea id="prompt" rows="3" value=${text} onInput=${(e) => setText(e.target.value)}
                  onKeyDown=${(e) => { if (e.key === "Enter" && !e.shiftKey) send(e); }}></textarea>
        <button type="submit" disabled=${busy || !model}>${busy ? "Answering..." : "Send"}</button>
      </form>
    </section>`;
}
