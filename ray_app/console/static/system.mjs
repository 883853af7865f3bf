import { useEffect, useState } from "./vendor/preact-hooks.mjs";
import { api } from "./api.mjs";
import { ErrorLine, html } from "./ui.mjs";

const pct = (x) => (x == null ? "" : `${Math.round(x)}%`);

export function System() {
  const [status, setStatus] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const load = () => api("/v1/system/status").then((s) => { setStatus(s); setError(null); }, setError);
    load();
    const timer = setInterval(load, 5000);
    return () => clearInterval(timer);
  }, []);
  return html`
    <section class="system">
      <h2>System</h2>
      <${ErrorLine} error=${error} />
      ${status && html`
        <p><a href=${status.dashboard_url || `${location.protocol}//${location.hostname}:8265`} target="_blank"
          rel="noopener">Ray dashboard</a> (GPU and per-actor monitoring)</p>
        <table><caption>Nodes</caption>
          <thead><tr><th>node</th><th>logical CPUs</th><th>CPU use</th><th>memory</th><th>GPUs</th></tr></thead>
          <tbody>${status.nodes.map((n) => html`<tr><td>${n.address}${n.alive ? "" : " (dead)"}</td><td>${n.cpus}</td>
            <td>${pct(n.usage?.cpu_percent)}</td>
            <td>${n.usage ? `${n.usage.memory_used_gib} / ${n.usage.memory_total_gib} GiB` : ""}</td>
            <td>${(n.usage?.gpus || []).map((g) => `${g.name}: ${pct(g.utilization_percent)}, ${g.memory_used_mib}/${g.memory_total_mib} MiB`).join("; ")
                  || (n.gpus ? n.gpus : "none")}</td></tr>`)}</tbody></table>
        <table><caption>Deployments</caption>
          <thead><tr><th>deployment</th><th>status</th><th>replicas</th></tr></thead>
          <tbody>${Object.entries(status.deployments).map(([name, d]) => html`<tr><td>${name}</td>
            <td><span class=${`status ${d.status}`}>${d.status}</span></td>
            <td>${Object.entries(d.replicas).map(([state, n]) => `${n} ${state}`).join(", ")}</td></tr>`)}</tbody></table>
        <table><caption>LLM queues</caption>
          <thead><tr><th>model</th><th>requests in the engine</th></tr></thead>
          <tbody>${Object.entries(status.queues).map(([name, q]) => html`<tr><td>${name}</td>
            <td>${q.unfinished_requests ?? "unknown"}</td></tr>`)}</tbody></table>`}
    </section>`;
}
