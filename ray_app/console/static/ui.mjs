// Small shared pieces: htm bound to Preact, an error line, a chart, number formats.
import { h } from "./vendor/preact.mjs";
import { useEffect, useRef } from "./vendor/preact-hooks.mjs";
import htm from "./vendor/htm.mjs";

export const html = htm.bind(h);

export function ErrorLine({ error }) {
  if (!error) return null;
  const code = error.code ? ` (${error.code})` : "";
  return html`<p class="error" role="alert">${error.status ? `${error.status}: ` : ""}${error.message}${code}</p>`;
}

// A uPlot chart that redraws when its data change and fits its container's width.
export function Chart({ title, series, data, bars = false, height = 220, label }) {
  const box = useRef(null);
  useEffect(() => {
    if (!box.current || !data || !data[0] || !data[0].length) return undefined;
    const width = Math.max(260, box.current.clientWidth);
    const paths = bars ? uPlot.paths.bars({ size: [0.6, 60] }) : undefined;
    const colours = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626"];
    const plot = new uPlot({
      title, width, height,
      scales: { x: { time: false } },
      series: [{ label: label || "x" }, ...series.map((s, i) => ({
        label: s, stroke: colours[i % colours.length], width: 2, paths,
        fill: bars ? colours[i % colours.length] + "99" : undefined, points: { show: !bars },
      }))],
      axes: [{}, { size: 60 }],
    }, data, box.current);
    return () => plot.destroy();
  }, [JSON.stringify(data), title]);
  return html`<figure class="chart" aria-label=${title}><div ref=${box}></div></figure>`;
}

export const usd = (x) => (x == null ? "" : `$${Number(x).toFixed(x < 0.01 ? 6 : 4)}`);
export const int = (x) => (x == null ? "" : Number(x).toLocaleString("en"));
// an ISO string (documents) or seconds since the epoch (jobs, events)
export const when = (t) => (t ? new Date(typeof t === "number" ? t * 1000 : t).toLocaleString() : "");
