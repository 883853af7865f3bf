import { useEffect, useState } from "./vendor/preact-hooks.mjs";
import { api } from "./api.mjs";
import { Chart, ErrorLine, html, int, when } from "./ui.mjs";

function JobDetail({ job }) {
  const [events, setEvents] = useState([]);
  useEffect(() => {
    let live = true;
    const load = () => api(`/v1/fine_tuning/jobs/${job.id}/events?limit=1000`).then(
      (r) => live && setEvents([...r.data].reverse()), () => {});
    load();
    const timer = ["succeeded", "failed", "cancelled"].includes(job.status) ? null : setInterval(load, 3000);
    return () => { live = false; if (timer) clearInterval(timer); };
  }, [job.id, job.status]);
  const metrics = events.filter((e) => e.type === "metrics" && e.data && e.data.step != null);
  const data = [metrics.map((e) => e.data.step), metrics.map((e) => e.data.train_loss),
                metrics.map((e) => e.data.valid_loss ?? null)];
  return html`
    <div class="job">
      <h3>${job.id} <span class=${`status ${job.status}`}>${job.status}</span></h3>
      <p>${job.model} → <b>${job.fine_tuned_model || "(not yet)"}</b>, ${int(job.trained_tokens)} tokens trained
        ${job.error && html`<span class="error">${job.error.message}</span>`}</p>
      ${metrics.length ? html`<${Chart} title="Loss" label="step" series=${["training loss", "validation loss"]} data=${data} />`
                       : html`<p>No loss reported yet.</p>`}
      <ol class="events" aria-label="Events">${events.slice(-12).map((e) => html`<li>${when(e.created_at)}: ${e.message}</li>`)}</ol>
    </div>`;
}

function Registry() {
  const [lines, setLines] = useState([]);
  const [error, setError] = useState(null);
  const [note, setNote] = useState("");
  const load = () => api("/v1/adapters").then((r) => setLines(r.data), setError);
  useEffect(() => { load(); }, []);
  async function act(path, json, done) {
    setError(null);
    try { await api(path, { method: "POST", json }); setNote(done); load(); } catch (err) { setError(err); }
  }
  return html`
    <h3>Adapters in the registry</h3>
    <${ErrorLine} error=${error} />
    ${note && html`<p role="status">${note}</p>`}
    ${lines.map((line) => html`
      <table class="registry"><caption>${line.name} on ${line.base_model} (champion: version ${line.champion ?? "none"})</caption>
        <thead><tr><th>version</th><th>aliases</th><th>parity</th><th>adapter score</th><th>base score</th><th></th></tr></thead>
        <tbody>${line.versions.map((v) => html`<tr>
          <td>${v.version}</td><td>${v.aliases.join(", ")}</td><td>${v.tags.parity || ""}</td>
          <td>${v.tags.adapter_task_score || ""}</td><td>${v.tags.base_task_score || ""}</td>
          <td>${!v.aliases.includes("champion") && html`<button onClick=${() => act(
            `/v1/adapters/${encodeURIComponent(line.name)}/promote`, { version: v.version },
            `${line.name}: version ${v.version} is champion`)}>Promote</button>`}</td></tr>`)}</tbody>
      </table>
      <button onClick=${() => act(`/v1/adapters/${encodeURIComponent(line.name)}/rollback`, {},
                                  `${line.name}: rolled back`)}>Roll back ${line.name}</button>`)}`;
}

export function Training() {
  const [jobs, setJobs] = useState([]);
  const [chosen, setChosen] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const load = () => api("/v1/fine_tuning/jobs?limit=50").then((r) => setJobs(r.data), setError);
    load();
    const timer = setInterval(load, 5000);
    return () => clearInterval(timer);
  }, []);
  const job = jobs.find((j) => j.id === chosen) || jobs[0];
  return html`
    <section class="training">
      <h2>Fine-tuning</h2>
      <${ErrorLine} error=${error} />
      <table><caption>Jobs (newest first)</caption>
        <thead><tr><th>job</th><th>base</th><th>status</th><th>model</th><th>created</th><th></th></tr></thead>
        <tbody>${jobs.map((j) => html`<tr class=${job && j.id === job.id ? "chosen" : ""}>
          <td>${j.id}</td><td>${j.model}</td><td><span class=${`status ${j.status}`}>${j.status}</span></td>
          <td>${j.fine_tuned_model || ""}</td><td>${when(j.created_at)}</td>
          <td><button onClick=${() => setChosen(j.id)}>Show</button></td></tr>`)}</tbody></table>
      ${job ? html`<${JobDetail} job=${job} />` : html`<p>No fine-tuning jobs yet: create one with
        <code>client.fine_tuning.jobs.create(...)</code>.</p>`}
      <${Registry} />
    </section>`;
}
