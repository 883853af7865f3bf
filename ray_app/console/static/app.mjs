import { render } from "./vendor/preact.mjs";
import { useEffect, useRef, useState } from "./vendor/preact-hooks.mjs";
import { api, getKey, setKey } from "./api.mjs";
import { Chat } from "./chat.mjs";
import { Documents } from "./documents.mjs";
import { System } from "./system.mjs";
import { Training } from "./training.mjs";
import { Usage } from "./usage.mjs";
import { html } from "./ui.mjs";

const PAGES = [
  ["chat", "Chat", Chat], ["documents", "Documents", Documents], ["training", "Training", Training],
  ["usage", "Usage", Usage], ["system", "System", System],
];

function KeyForm({ mode, onSaved }) {
  const [value, setValue] = useState("");
  const save = (e) => { e.preventDefault(); setKey(value.trim()); setValue(""); onSaved(); };
  return html`
    <form class="key" onSubmit=${save}>
      <label for="api-key">API key${mode === "keys" ? " (this server requires one)" : " (optional)"}</label>
      <input id="api-key" type="password" autocomplete="off" placeholder="rk-..." value=${value}
             onInput=${(e) => setValue(e.target.value)} />
      <button type="submit">Use key</button>
      ${getKey() && html`<button type="button" onClick=${() => { setKey(""); onSaved(); }}>Forget key</button>`}
      <small>Kept in this browser tab only (session storage).</small>
    </form>`;
}

function App() {
  const initial = (location.hash || "#chat").slice(1);
  const [page, setPage] = useState(PAGES.some(([id]) => id === initial) ? initial : "chat");
  const [health, setHealth] = useState(null);
  const [keyed, setKeyed] = useState(getKey() !== "");
  const tabs = useRef([]);
  useEffect(() => { api("/health").then(setHealth, (e) => setHealth({ status: "unavailable", detail: e.message })); }, []);
  useEffect(() => { location.hash = page; }, [page]);

  // the tab pattern of WAI-ARIA: arrows move between tabs, Home/End to the ends
  const onKey = (e) => {
    const at = PAGES.findIndex(([id]) => id === page);
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: PAGES.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    const next = (to + PAGES.length) % PAGES.length;
    setPage(PAGES[next][0]);
    tabs.current[next]?.focus();
  };
  const Page = PAGES.find(([id]) => id === page)[2];
  const needsKey = health?.auth === "keys" && !keyed;
  return html`
    <header>
      <h1>ray_app</h1>
      <span class=${`status ${health?.status === "ok" ? "ok" : "bad"}`} role="status">
        ${health ? `server ${health.status}, auth ${health.auth || "open"}` : "connecting..."}</span>
      <${KeyForm} mode=${health?.auth} onSaved=${() => setKeyed(getKey() !== "")} />
    </header>
    <nav role="tablist" aria-label="Console pages" onKeyDown=${onKey}>
      ${PAGES.map(([id, label], i) => html`
        <button role="tab" id=${`tab-${id}`} aria-controls=${`page-${id}`} aria-selected=${page === id}
                tabindex=${page === id ? 0 : -1} ref=${(el) => (tabs.current[i] = el)}
                onClick=${() => setPage(id)}>${label}</button>`)}
    </nav>
    <main id=${`page-${page}`} role="tabpanel" aria-labelledby=${`tab-${page}`}>
      ${needsKey ? html`<p class="error" role="alert">This server is in keys mode: enter an API key above.</p>`
                 : html`<${Page} key=${`${page}-${keyed}`} />`}
    </main>`;
}

render(html`<${App} />`, document.getElementById("app"));
