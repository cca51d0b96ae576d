// The neuron explorer's page: three views over the JSON endpoints of sentiment_discovery/explore.py.
"use strict";

// ColorBrewer RdYlGn (11 classes): red negative, yellow 0, green positive, as generate.py's heatmap.
const STOPS = ["#a50026", "#d73027", "#f46d43", "#fdae61", "#fee08b", "#ffffbf",
  "#d9ef8b", "#a6d96a", "#66bd63", "#1a9850", "#006837"].map(hex => [1, 3, 5].map(i => parseInt(hex.substr(i, 2), 16)));
const TRACE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const $ = id => document.getElementById(id);
let INFO = null;

function colour(value, range) {
  const t = Math.max(-1, Math.min(1, value / range));
  const x = (t + 1) / 2 * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}

function textColour(rgb) {  // black on light backgrounds, white on dark ones (relative luminance)
  const lin = rgb.map(c => { c /= 255; return c <= 0.04045 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); });
  return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] > 0.18 ? "#000" : "#fff";
}

function renderChars(box, chars, range, append) {
  if (!append) box.textContent = "";
  for (const [ch, v, generated] of chars) {
    const span = document.createElement("span");
    const rgb = colour(v, range);
    span.textContent = ch === "\n" ? "\u21b5\n" : ch;
    span.style.background = `rgb(${rgb})`;
    span.style.color = textColour(rgb);
    span.dataset.v = v;
    span.title = `${JSON.stringify(ch)}: ${v.toFixed(3)}`;
    if (generated) span.className = "generated";
    box.appendChild(span);
  }
}

function renderLegend(box, range, what) {
  const gradient = STOPS.map(c => `rgb(${c})`).join(",");
  box.innerHTML = `<span>${(-range).toFixed(2)}</span><span class="bar" style="background:linear-gradient(to right,${gradient})"></span>` +
    `<span>+${range.toFixed(2)}</span><span>${what}</span>`;
}

function say(text, note) {
  $("message").textContent = text || "";
  $("message").className = note ? "note" : "";
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

const signed = (v, d) => `${v >= 0 ? "+" : ""}${v.toFixed(d)}`;

function unitLabel(u) {
  const perClass = u.class_weights ? "; weights " + u.class_weights.map(([c, v]) => `${c} ${signed(v, 3)}`).join(", ") : "";
  const w = (u.weight === null ? (INFO.classifier ? "no weight towards positive" : "no classifier") :
    `weight ${signed(u.weight, 3)}`) + perClass;
  return `feature ${u.feature} = ${u.pooling} of unit ${u.unit}` + (INFO.n_layers > 1 ? ` (layer ${u.layer})` : "") + `, ${w}`;
}

function valueWhat(polarity) {
  return `${INFO.state} value × polarity ${polarity > 0 ? "+1" : "-1"}: green = higher means more positive`;
}

// ---- views

function show(view) {
  for (const v of ["try", "units", "steer"]) {
    $("view-" + v).classList.toggle("active", v === view);
    $("tab-" + v).classList.toggle("active", v === view);
  }
  say("");
  if (view === "units" && !$("unit-list").tBodies[0].rows.length) searchUnits();
}

// ---- Try text

let textSeq = 0, textTimer = null;

function chosenFeature() {
  const typed = $("unit-number").value.trim();
  return typed === "" ? Number($("unit-select").value) : Number(typed);
}

function scheduleText() {
  clearTimeout(textTimer);
  textTimer = setTimeout(analyseText, 120);  // debounce: one request per pause in typing
}

async function analyseText() {
  const seq = ++textSeq, text = $("text").value;
  if (!text.trim()) {
    $("chars").textContent = ""; $("p-positive").textContent = ""; $("traces").textContent = "";
    say("Type a sentence to see the unit's value after each character.", true);
    return;
  }
  try {
    const r = await api("/api/text", {text, feature: chosenFeature()});
    if (seq !== textSeq) return;  // a newer request is on its way
    say("");
    $("unit-caption").textContent = unitLabel(r.unit);
    renderLegend($("legend"), r.range, valueWhat(r.polarity));
    renderChars($("chars"), r.chars, r.range);
    const p = $("p-positive");
    p.dataset.p = r.p_positive === null ? "" : r.p_positive;
    p.textContent = describeProbabilities(r);
    $("latency").textContent = `${r.ms} ms on the server`;
    renderTraces($("traces"), r.traces, r.chars.map(c => c[0]));
  } catch (e) {
    if (seq === textSeq) say(e.message);
  }
}

function describeProbabilities(r) {  // P(positive), or each class's P for a classifier of K classes
  if (!r.probabilities) return "no classifier: no P(positive)";
  if (!INFO.classes) return `P(${INFO.binary_names[1]}) = ${r.p_positive.toFixed(3)}`;
  return r.probabilities.map(([c, p]) => `P(${c}) = ${p.toFixed(3)}`).join(", ");
}

function renderTraces(box, traces, chars) {
  const n = chars.length, w = Math.max(300, Math.min(1050, 9 * n)), h = 160, pad = 34;
  const x = i => pad + (n <= 1 ? 0 : i * (w - pad - 6) / (n - 1)), y = v => h / 2 - (h / 2 - 10) * Math.max(-1, Math.min(1, v));
  let svg = `<svg width="${w}" height="${h + 20}" role="img"><line x1="${pad}" x2="${w}" y1="${h / 2}" y2="${h / 2}" stroke="#bbb"/>` +
    `<text x="0" y="14">+range</text><text x="0" y="${h - 4}">-range</text>`;
  traces.forEach((t, k) => {
    const points = t.values.map((v, i) => `${x(i).toFixed(1)},${y(v / t.range).toFixed(1)}`).join(" ");
    svg += `<polyline fill="none" stroke="${TRACE_COLOURS[k % 8]}" stroke-width="1.5" points="${points}"><title>feature ${t.feature}</title></polyline>`;
  });
  svg += "</svg>";
  const legend = traces.map((t, k) => `<span style="color:${TRACE_COLOURS[k % 8]}">■ unit ${t.unit} (f${t.feature}, ${t.weight === null ? "" : signed(t.weight, 2)})</span>`).join(" ");
  box.innerHTML = svg + `<div class="caption">${legend}; each scaled to its range over the corpus, × polarity</div>`;
}

// ---- Units

async function searchUnits() {
  try {
    const q = encodeURIComponent($("unit-search").value.trim());
    const r = await api(`/api/units?rank=${$("rank").value}&q=${q}&limit=60`);
    $("rank-caption").textContent = `ranked by ${r.described}`;
    const body = $("unit-list").tBodies[0];
    body.textContent = "";
    for (const u of r.units) {
      const row = body.insertRow();
      row.dataset.feature = u.feature;
      const fmt = (v, d) => v === null ? "–" : v.toFixed(d);
      for (const cell of [u.feature, u.unit, u.pooling, fmt(u.weight, 3), fmt(u.accuracy, 3), fmt(u.auc, 3)])
        row.insertCell().textContent = cell;
      row.onclick = () => openUnit(u.feature);
    }
    if (!r.units.length) say("no unit matches that search", true);
  } catch (e) { say(e.message); }
}

async function openUnit(feature) {
  try {
    const r = await api(`/api/unit?feature=${encodeURIComponent(feature)}`);
    for (const row of $("unit-list").tBodies[0].rows) row.classList.toggle("selected", row.dataset.feature == feature);
    const u = r.unit, box = $("unit-detail");
    const fmt = (v, d) => v === null ? "–" : v.toFixed(d);
    box.innerHTML = `<h2 id="unit-title">${unitLabel(u)}</h2>
      <p>accuracy alone (best threshold on these ${INFO.corpus.texts} texts): <b id="unit-accuracy">${fmt(u.accuracy, 3)}</b>;
      AUC ${fmt(u.auc, 3)}; colour range ±${u.range.toFixed(2)} (per-byte ${INFO.state} value)</p>
      <div id="histogram"></div><div id="unit-legend" class="legend"></div>
      <h3>Texts that excite it most</h3><ul class="examples" id="most"></ul>
      <h3>Texts that excite it least</h3><ul class="examples" id="least"></ul>`;
    renderHistogram($("histogram"), r.histogram, u);
    renderLegend($("unit-legend"), r.range, valueWhat(r.polarity));
    for (const side of ["most", "least"]) {
      for (const t of r[side]) {
        const li = document.createElement("li"), value = document.createElement("span"), text = document.createElement("span");
        value.className = "value";
        value.textContent = `${t.value.toFixed(3)}${t.label === undefined ? "" : t.label ? " pos" : " neg"}`;
        text.className = "chars";
        renderChars(text, t.chars, r.range);
        li.append(value, text);
        $(side).appendChild(li);
      }
    }
    say("");
  } catch (e) { say(e.message); }
}

function renderHistogram(box, hist, u) {
  const e = hist.edges, w = 520, h = 150, pad = 30, n = e.length - 1;
  const series = hist.all ? [["all", hist.all, "#555"]] : [["negative", hist.negative, "#d73027"], ["positive", hist.positive, "#1a9850"]];
  const top = Math.max(1, ...series.flatMap(s => s[1]));
  const bw = (w - pad) / n;
  let svg = `<svg width="${w}" height="${h + 36}" role="img">`;
  const sw = (bw - 1) / series.length;  // the classes side by side within each bin
  series.forEach(([name, counts, c], j) =>
    counts.forEach((k, i) => { const bh = (h - 8) * k / top; svg += `<rect x="${pad + i * bw + j * sw}" y="${h - bh}" width="${sw}" height="${bh}" fill="${c}" fill-opacity="0.8"><title>${name}: ${k}</title></rect>`; }));
  svg += `<line x1="${pad}" x2="${w}" y1="${h}" y2="${h}" stroke="#999"/><text x="${pad}" y="${h + 14}">${e[0].toFixed(2)}</text>` +
    `<text x="${w - 40}" y="${h + 14}">${e[n].toFixed(2)}</text><text x="${pad + 80}" y="${h + 30}">${u.pooling} ${INFO.state} value of unit ${u.unit} per text: ` +
    series.map(s => `<tspan fill="${s[2]}">■ ${s[0]}</tspan>`).join(" ") + `</text><text x="0" y="12">${top}</text></svg>`;
  box.innerHTML = svg;
}

// ---- Steer

async function steer() {
  const out = $("steer-out");
  out.textContent = ""; $("steer-p").textContent = ""; $("steer-status").textContent = "generating…";
  $("generate").disabled = true;
  const request = {
    prompt: $("prompt").value, feature: Number($("steer-unit").value), mode: $("mode").value,
    value: $("force-on").checked ? Number($("force").value) : null,
    temperature: Number($("temperature").value), length: Number($("length").value), seed: Number($("seed").value),
  };
  try {
    const response = await fetch("/api/steer", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request)});
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || `the server answered ${response.status}`);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", range = 1;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const msg = JSON.parse(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 1);
        if (msg.error) throw new Error(msg.error);
        if (msg.unit) {
          range = msg.range;
          renderLegend($("steer-legend"), range, valueWhat(msg.polarity));
          $("steer-status").textContent = `${unitLabel(msg.unit)}; ` + (msg.written === null ? "not forced" : `writing ${msg.written.toFixed(2)}`);
        }
        if (msg.chars) renderChars(out, msg.chars, range, true);
        if (msg.done) {
          $("steer-status").textContent += " — done";
          $("steer-p").dataset.p = msg.p_positive === null ? "" : msg.p_positive;
          $("steer-p").textContent = msg.probabilities ? describeProbabilities(msg) + " (the whole text)" : "";
        }
      }
    }
  } catch (e) {
    say(e.message); $("steer-status").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
}

// ---- start

async function start() {
  try {
    INFO = await api("/api/info");
  } catch (e) { say(e.message); return; }
  INFO.n_layers = Number((INFO.architecture.match(/(\d+) layer/) || [0, 1])[1]);
  $("model-info").textContent = `${INFO.model}: ${INFO.architecture}; features ${INFO.pooling} ${INFO.state} state; ` +
    `${INFO.classifier ? "with" : "no"} classifier; corpus ${INFO.corpus.texts} texts${INFO.corpus.labelled ? ", labelled" : ""}`;
  for (const u of INFO.top) $("unit-select").add(new Option(`${u.feature} (unit ${u.unit}, ${u.pooling})`, u.feature));
  if (!INFO.top.some(u => u.feature === INFO.default_feature)) $("unit-select").add(new Option(`${INFO.default_feature}`, INFO.default_feature), 0);
  $("unit-select").value = INFO.default_feature;
  $("steer-unit").value = INFO.default_feature;
  $("unit-number").max = $("steer-unit").max = INFO.n_features - 1;
  $("length").max = INFO.max_steer_bytes;
  for (const [k, d] of Object.entries(INFO.rankings)) $("rank").add(new Option(k, k, false, k === INFO.default_ranking));
  $("rank").title = Object.entries(INFO.rankings).map(([k, d]) => `${k}: ${d}`).join("\n");

  document.querySelectorAll(".tab").forEach(b => b.onclick = () => show(b.dataset.view));
  $("text").addEventListener("input", scheduleText);
  $("unit-select").onchange = () => { $("unit-number").value = ""; analyseText(); };
  $("unit-number").addEventListener("input", scheduleText);
  $("rank").onchange = searchUnits;
  $("unit-search-go").onclick = searchUnits;
  $("unit-search").addEventListener("keydown", e => { if (e.key === "Enter") searchUnits(); });
  $("force").oninput = () => { $("force-value").textContent = (Number($("force").value) >= 0 ? "+" : "") + Number($("force").value).toFixed(2); };
  $("generate").onclick = steer;
  show("try");
  $("text").value = "The acting was dull, but the ending was wonderful.";
  analyseText();
}

start();
