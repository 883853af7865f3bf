import { useEffect, useState } from "./vendor/preact-hooks.mjs";
import { api, upload } from "./api.mjs";
import { ErrorLine, html, int, when } from "./ui.mjs";

function Uploads({ collection, onDone }) {
  const [files, setFiles] = useState([]);  // {name, progress, outcome, error}
  async function send(e) {
    const chosen = [...e.target.files];
    e.target.value = "";
    const start = files.length;
    setFiles((all) => [...all, ...chosen.map((f) => ({ name: f.name, progress: 0 }))]);
    const set = (i, patch) => setFiles((all) => all.map((f, j) => (j === i ? { ...f, ...patch } : f)));
    for (const [n, file] of chosen.entries()) {  // one at a time: the server indexes each as it arrives
      try {
        set(start + n, { outcome: await upload(collection, file, (p) => set(start + n, { progress: p })), progress: 1 });
      } catch (err) {
        set(start + n, { error: err, progress: 1 });
      }
    }
    onDone();
  }
  return html`
    <div class="uploads">
      <label for="upload-files">Upload files to <b>${collection}</b></label>
      <input id="upload-files" type="file" multiple onChange=${send} />
      <ul aria-label="Uploads">${files.map((f) => html`
        <li class=${f.error ? "refused" : f.outcome ? "done" : ""}>
          <span class="name">${f.name}</span>
          <progress max="1" value=${f.progress} aria-label=${`upload of ${f.name}`}></progress>
          ${f.outcome && html`<span class="outcome">${f.outcome.status}${f.outcome.chunks != null
            ? `, ${f.outcome.chunks} chunks` : ""}</span>`}
          ${f.error && html`<span class="outcome" role="alert">refused${f.error.code ? ` (${f.error.code})` : ""}:
            ${f.error.message}</span>`}
        </li>`)}</ul>
    </div>`;
}

function Retrieve({ collection }) {
  const [query, setQuery] = useState("");
  const [hits, setHits] = useState(null);
  const [error, setError] = useState(null);
  async function run(e) {
    e.preventDefault();
    setError(null);
    try { setHits((await api("/v1/retrieve", { method: "POST", json: { collection, query, top_k: 5 } })).data); }
    catch (err) { setError(err); }
  }
  return html`
    <form class="row" onSubmit=${run}>
      <label>Try a retrieval query <input value=${query} onInput=${(e) => setQuery(e.target.value)} /></label>
      <button type="submit" disabled=${!query}>Search</button>
    </form>
    <${ErrorLine} error=${error} />
    ${hits && html`<table class="hits"><caption>Ranked chunks</caption>
      <thead><tr><th>#</th><th>score</th><th>source</th><th>page</th><th>sensitivity</th><th>text</th></tr></thead>
      <tbody>${hits.map((h) => html`<tr><td>${h.rank}</td><td>${h.score.toFixed(4)}</td><td>${h.title || h.source}</td>
        <td>${h.page ?? ""}</td><td><span class=${`label ${h.sensitivity}`}>${h.sensitivity}</span></td>
        <td class="text">${h.text.slice(0, 300)}</td></tr>`)}</tbody></table>`}`;
}

export function Documents() {
  const [collections, setCollections] = useState([]);
  const [chosen, setChosen] = useState("");
  const [documents, setDocuments] = useState([]);
  const [name, setName] = useState("");
  const [error, setError] = useState(null);

  const refresh = () => api("/v1/collections").then((r) => {
    setCollections(r.data);
    setChosen((c) => c || (r.data[0] && r.data[0].name) || "");
  }, setError);
  const listDocuments = () => chosen && api(`/v1/collections/${encodeURIComponent(chosen)}/documents`).then(
    (r) => setDocuments(r.data), setError);
  useEffect(() => { refresh(); }, []);
  useEffect(() => { listDocuments(); }, [chosen]);

  async function create(e) {
    e.preventDefault();
    setError(null);
    try { await api("/v1/collections", { method: "POST", json: { name } }); setChosen(name); setName(""); refresh(); }
    catch (err) { setError(err); }
  }
  async function remove(doc) {
    setError(null);
    try { await api(`/v1/collections/${encodeURIComponent(chosen)}/documents/${doc.doc_id}`, { method: "DELETE" }); }
    catch (err) { setError(err); }
    listDocuments(); refresh();
  }
  return html`
    <section class="documents">
      <h2>Documents</h2>
      <${ErrorLine} error=${error} />
      <table><caption>Collections</caption>
        <thead><tr><th>collection</th><th>documents</th><th>chunks</th><th>default label</th><th></th></tr></thead>
        <tbody>${collections.map((c) => html`<tr class=${c.name === chosen ? "chosen" : ""}>
          <td>${c.name}</td><td>${int(c.documents)}</td><td>${int(c.points)}</td><td>${c.default_sensitivity || ""}</td>
          <td><button onClick=${() => setChosen(c.name)} aria-pressed=${c.name === chosen}>Open</button></td></tr>`)}
        </tbody></table>
      <form class="row" onSubmit=${create}>
        <label>New collection <input value=${name} pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]*" onInput=${(e) => setName(e.target.value)} /></label>
        <button type="submit" disabled=${!name}>Create</button>
      </form>
      ${chosen && html`
        <${Uploads} collection=${chosen} onDone=${() => { listDocuments(); refresh(); }} />
        <table class="docs"><caption>Documents in ${chosen}</caption>
          <thead><tr><th>source</th><th>chunks</th><th>sensitivity</th><th>indexed</th><th></th></tr></thead>
          <tbody>${documents.map((d) => html`<tr><td>${d.title || d.source}</td><td>${d.chunks}</td>
            <td><span class=${`label ${d.sensitivity}`}>${d.sensitivity}</span></td><td>${when(d.ingested_at)}</td>
            <td><button onClick=${() => remove(d)} aria-label=${`Delete ${d.source}`}>Delete</button></td></tr>`)}
          </tbody></table>
        <${Retrieve} collection=${chosen} />`}
    </section>`;
}
