#include "server/observe/page.h"

#include <array>

namespace fedlora::server {
namespace {

constexpr std::string_view kHtml = R"page(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedlora coordinator</title>
<link rel="stylesheet" href="/page.css">
</head>
<body data-state="loading">
<header>
  <h1>fedlora <small id="run-id"></small></h1>
  <p id="phase">loading…</p>
</header>
<main>
  <section class="cards">
    <div><span class="label">round</span><span class="value" id="round"></span></div>
    <div><span class="label">rounds committed</span><span class="value" id="rounds-committed"></span></div>
    <div><span class="label">held-out loss</span><span class="value" id="eval-loss"></span></div>
    <div><span class="label">held-out accuracy</span><span class="value" id="eval-accuracy"></span></div>
    <div><span class="label">ε spent</span><span class="value" id="epsilon"></span></div>
    <div><span class="label">clients live / joined</span><span class="value" id="client-count"></span></div>
  </section>
  <section class="plots">
    <figure><figcaption>held-out loss per round</figcaption><svg id="plot-loss" viewBox="0 0 480 200"></svg></figure>
    <figure><figcaption>held-out accuracy per round</figcaption><svg id="plot-accuracy" viewBox="0 0 480 200"></svg></figure>
  </section>
  <section>
    <h2>Rounds</h2>
    <table id="rounds"></table>
  </section>
  <section>
    <h2>Clients</h2>
    <table id="clients"></table>
  </section>
  <section>
    <h2>Settings</h2>
    <table id="settings"></table>
  </section>
</main>
<footer id="updated"></footer>
<script src="/page.js"></script>
</body>
</html>
)page";

constexpr std::string_view kCss =
    R"page(:root { --ink: #1d2430; --muted: #667085; --line: #e4e7ec; --accent: #2f6fde; --bad: #c4320a; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--ink); background: #f7f8fa; }
header { padding: 16px 24px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { margin: 0; font-size: 20px; } h1 small { color: var(--muted); font-weight: normal; font-size: 13px; }
h2 { font-size: 15px; margin: 24px 0 8px; }
#phase { margin: 4px 0 0; color: var(--muted); }
body[data-state="stale"] #phase, body[data-state="stale"] footer { color: var(--bad); }
main { padding: 8px 24px 24px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-top: 16px; }
.cards div { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.label { display: block; color: var(--muted); font-size: 12px; }
.value { display: block; font-size: 20px; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 12px; margin-top: 12px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figcaption { color: var(--muted); font-size: 12px; }
svg { width: 100%; height: auto; }
svg .axis { stroke: var(--line); } svg text { fill: var(--muted); font-size: 11px; }
svg polyline { fill: none; stroke: var(--accent); stroke-width: 2; } svg circle { fill: var(--accent); }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: right; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child, td.text { text-align: left; }
#rounds th:nth-child(2), #clients th:nth-child(2), #clients th:last-child, #settings th { text-align: left; }
th { color: var(--muted); font-weight: normal; font-size: 12px; }
tr.current td { background: #eef4ff; }
tr.removed td { color: var(--bad); }
footer { padding: 0 24px 24px; color: var(--muted); font-size: 12px; }
)page";

constexpr std::string_view kJs = R"page('use strict';
// The live page: polls /api/run every two seconds and draws it. Text goes in as text, never as
// markup.
const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

function num(v, digits = 6) {
  if (v === undefined || v === null) return '–';
  return Number.isInteger(v) ? String(v) : Number(v).toPrecision(digits);
}
function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; ++i) n /= 1024;
  return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
}
function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fill(table, head, rows) {
  const thead = document.createElement('thead');
  const tr = document.createElement('tr');
  for (const h of head) {
    const th = document.createElement('th');
    th.textContent = h;
    tr.appendChild(th);
  }
  thead.appendChild(tr);
  const tbody = document.createElement('tbody');
  for (const row of rows) tbody.appendChild(row);
  table.replaceChildren(thead, tbody);
}
function row(cells, attrs = {}) {
  const tr = document.createElement('tr');
  for (const [k, v] of Object.entries(attrs)) tr.setAttribute(k, v);
  for (const c of cells) tr.appendChild(c);
  return tr;
}
function plot(svg, points) {
  const W = 480, H = 200, L = 56, R = 12, T = 10, B = 24;
  const kids = [];
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    kids.push(e);
    return e;
  };
  add('line', {class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B});
  add('line', {class: 'axis', x1: L, y1: T, x2: L, y2: H - B});
  if (points.length === 0) {
    add('text', {x: L + 8, y: H / 2}, 'no evaluated round yet');
    svg.replaceChildren(...kids);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  add('text', {x: 4, y: T + 10}, num(y1, 4));
  add('text', {x: 4, y: H - B}, num(y0, 4));
  add('text', {x: L, y: H - 6}, 'round ' + x0);
  add('text', {x: W - R - 60, y: H - 6}, 'round ' + x1);
  add('polyline', {points: points.map((p) => sx(p[0]) + ',' + sy(p[1])).join(' ')});
  for (const [x, y] of points) add('circle', {cx: sx(x), cy: sy(y), r: 3}).appendChild(
      Object.assign(document.createElementNS(SVG, 'title'), {textContent: 'round ' + x + ': ' + num(y)}));
  svg.replaceChildren(...kids);
}

function render(d) {
  const s = d.status, rounds = d.rounds, last = rounds[rounds.length - 1];
  $('run-id').textContent = s.run_id ? 'run ' + s.run_id : '';
  $('phase').textContent = s.phase + (s.waiting_for ? ': ' + s.waiting_for : '') +
      (s.follow_up ? ' · ' + s.follow_up : '');
  $('round').textContent = s.round + ' of ' + s.rounds;
  $('rounds-committed').textContent = String(Math.max(0, Number(s.state_version)));
  $('eval-loss').textContent = last ? num(last.eval_loss) : '–';
  $('eval-accuracy').textContent = last ? num(last.eval_accuracy, 4) : '–';
  $('epsilon').textContent = last && last.dp_epsilon !== undefined ? num(last.dp_epsilon, 4)
                            : (d.settings.dp_clip ? '∞' : 'no DP');
  const live = d.clients.filter((c) => c.state === 'live').length;
  $('client-count').textContent = live + ' / ' + d.clients.filter((c) => c.examples > 0).length;
  plot($('plot-loss'), rounds.filter((r) => r.eval_loss !== undefined).map((r) => [r.round, r.eval_loss]));
  plot($('plot-accuracy'),
       rounds.filter((r) => r.eval_accuracy !== undefined).map((r) => [r.round, r.eval_accuracy]));

  const rows = [];
  if (s.phase !== 'done' && s.phase !== 'failed') {
    rows.push(row([cell(String(s.round)), cell(s.phase + (s.waiting_for ? ': ' + s.waiting_for : ''), 'text'),
                   cell(s.arrived.length + ' / ' + s.cohort.length), cell(''), cell(''), cell(''),
                   cell(''), cell(''), cell('')], {class: 'current', 'data-round': s.round}));
  }
  for (const r of [...rounds].reverse()) {
    rows.push(row([cell(String(r.round)),
                   cell('committed' + (r.attempt > 1 ? ' after ' + r.attempt + ' attempts' : ''), 'text'),
                   cell(r.arrived + ' / ' + r.cohort), cell(String(r.rejected), 'rejected'),
                   cell(String(r.dropped + r.declined)), cell(num(r.mean_train_loss), 'train_loss'),
                   cell(num(r.eval_loss), 'eval_loss'), cell(num(r.eval_accuracy, 4), 'eval_accuracy'),
                   cell(num(r.dp_epsilon, 4), 'dp_epsilon')], {'data-round': r.round}));
  }
  fill($('rounds'), ['round', 'state', 'arrived / cohort', 'rejected', 'dropped or declined',
                     'train loss', 'held-out loss', 'accuracy', 'ε'], rows);

  fill($('clients'), ['client', 'state', 'last seen', 'examples', 'rounds aggregated', 'rejected',
                      'bytes up', 'bytes down', 'weight share', 'removed'],
       d.clients.map((c) => row([cell(c.id, 'text'), cell(c.state, 'text state'),
                                 cell(c.last_seen_s === undefined ? '–' : c.last_seen_s.toFixed(1) + ' s ago'),
                                 cell(String(c.examples)), cell(String(c.rounds_contributed)),
                                 cell(String(c.rejected_updates), 'rejected'), cell(bytes(c.bytes_up)),
                                 cell(bytes(c.bytes_down)),
                                 cell(c.weight_share === undefined ? '–' : (100 * c.weight_share).toFixed(1) + ' %'),
                                 cell(c.removed, 'text')],
                                {'data-client': c.id, class: c.state})));

  fill($('settings'), ['setting', 'value'],
       Object.entries(d.settings).map(([k, v]) => row([cell(k, 'text'), cell(String(v), 'text')])));
  $('updated').textContent = 'updated ' + new Date().toLocaleTimeString() + ' (every 2 s)';
  document.body.dataset.state = s.phase === 'done' ? 'done' : 'live';
}

async function refresh() {
  try {
    const response = await fetch('/api/run', {cache: 'no-store'});
    if (!response.ok) throw new Error('HTTP ' + response.status);
    render(await response.json());
  } catch (e) {
    document.body.dataset.state = 'stale';
    $('updated').textContent = 'cannot reach the coordinator (' + e.message + '); retrying';
  }
}
refresh();
setInterval(refresh, 2000);
)page";

constexpr std::array kAssets = {
    PageAsset{"/", kHtml, "text/html; charset=utf-8"},
    PageAsset{"/page.js", kJs, "text/javascript; charset=utf-8"},
    PageAsset{"/page.css", kCss, "text/css; charset=utf-8"},
};

}  // namespace

std::span<const PageAsset> PageAssets() { return kAssets; }

}  // namespace fedlora::server
