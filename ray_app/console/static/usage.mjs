import { useEffect, useState } from "./vendor/preact-hooks.mjs";
import { api } from "./api.mjs";
import { Chart, ErrorLine, html, int, usd } from "./ui.mjs";

export function Usage() {
  const [rows, setRows] = useState(null);
  const [total, setTotal] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    api("/v1/usage?group_by=key,model,day").then((r) => { setRows(r.data); setTotal(r.total); }, setError);
  }, []);
  if (error) return html`<section><h2>Usage</h2><${ErrorLine} error=${error} /></section>`;
  if (!rows) return html`<section><h2>Usage</h2><p>Loading...</p></section>`;
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const models = [...new Set(rows.map((r) => r.model))].sort();
  const sum = (f, m) => days.map((d) => rows.filter((r) => r.day === d && (!m || r.model === m))
    .reduce((s, r) => s + r[f], 0));
  // uPlot wants numeric x: days as their index, labelled in the table below
  const x = days.map((_, i) => i + 1);
  return html`
    <section class="usage">
      <h2>Usage</h2>
      <p>${`${int(total.requests)} requests, ${int(total.prompt_tokens)} prompt and ${int(total.completion_tokens)} completion tokens, `}
        <b class="total-cost">${usd(total.cost_usd)}</b> in all.</p>
      <div class="charts">
        <${Chart} title="Spend per day (USD)" label="day" bars series=${["spend"]} data=${[x, sum("cost_usd")]} />
        <${Chart} title="Tokens per day, by model" label="day" series=${models}
                  data=${[x, ...models.map((m) => sum("prompt_tokens", m).map((p, i) => p + sum("completion_tokens", m)[i]))]} />
      </div>
      <table><caption>Per key, model and day (UTC)</caption>
        <thead><tr><th>day</th><th>key</th><th>model</th><th>requests</th><th>tokens</th><th>spend</th></tr></thead>
        <tbody>${rows.map((r) => html`<tr><td>${r.day}</td><td>${r.key || "anonymous"}</td><td>${r.model}</td>
          <td>${int(r.requests)}</td><td>${int(r.prompt_tokens + r.completion_tokens)}</td><td>${usd(r.cost_usd)}</td></tr>`)}
        </tbody></table>
    </section>`;
}
