// The annofs dashboard page: plain JavaScript, no build step, nothing from the network.
// Every text from the store (paths, names, diffs) goes in through textContent, never as HTML.
"use strict";

const MAX_ROWS = 2000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

// Fetch `url` into a view: "loading…" in `box` meanwhile, the error there on failure (null).
async function load(box, url) {
  box.textContent = "loading…";
  try {
    const value = await getJSON(url);
    box.textContent = "";
    return value;
  } catch (err) {
    box.textContent = "";
    box.append(el("span", { class: "error", text: String(err.message || err) }));
    return null;
  }
}

const q = (path) => encodeURIComponent(path);
const when = (t) => new Date(t * 1000).toLocaleTimeString();
const whenFull = (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
const shortDigest = (d) => (d ? d.slice(0, 7 + 16) + "…" : "not computed");

function badge(verdict) {
  const v = verdict || "unknown";
  return el("span", { class: `badge v-${v}`, text: v });
}

function fileLink(path) {
  return el("a", { href: `#file=${path}`, class: "path", text: path });
}

// -- diff rendering ------------------------------------------------------------------------

// A unified diff (text) or the byte-range report with hex views (binaries), coloured.
function renderDiff(diff, kind) {
  const pre = el("pre", { class: "diff", "data-kind": kind || "" });
  let side = "";
  for (const line of diff.replace(/\n$/, "").split("\n")) {
    let cls = "ctx";
    if (kind === "binary" || kind?.startsWith("binary")) {
      if (line.startsWith("@@")) { cls = "hunk"; side = ""; }
      else if (line.startsWith("- ")) { cls = "del hdr"; side = "del"; }
      else if (line.startsWith("+ ")) { cls = "add hdr"; side = "add"; }
      else if (line.startsWith("  ") && side) {
        pre.append(hexLine(line, side), "\n");
        continue;
      } else if (line.startsWith("binary files")) cls = "meta";
    } else if (line.startsWith("+++") || line.startsWith("---")) cls = "hdr";
    else if (line.startsWith("@@")) cls = "hunk";
    else if (line.startsWith("+")) cls = "add";
    else if (line.startsWith("-")) cls = "del";
    else if (line.startsWith("\\") || line.startsWith("...")) cls = "meta";
    pre.append(el("span", { class: `dl ${cls}`, text: line }), "\n");
  }
  return pre;
}

// One hex row: bytes marked '*' by the server are the changed ones.
function hexLine(line, side) {
  const span = el("span", { class: `dl ${side}` });
  const parts = line.split(/(\S\S\*)/);
  for (const p of parts) {
    if (/^\S\S\*$/.test(p)) span.append(el("b", { class: "chg", text: p.slice(0, 2) }), " ");
    else span.append(p);
  }
  return span;
}

function signatureRows(stmts) {
  if (!stmts || !stmts.length) return el("p", { class: "muted", text: "no statements" });
  return el("table", { class: "sigs" },
    el("thead", {}, el("tr", {}, ["signer", "trusted", "claim / label", "time", "signed as"]
      .map((h) => el("th", { text: h })))),
    el("tbody", {}, stmts.map((s) => el("tr", {},
      el("td", { class: "key", text: s.signer }),
      el("td", { text: s.trusted === null || s.trusted === undefined ? "–" : (s.trusted ? "yes" : "no") }),
      el("td", { text: s.label ? `label ${s.label}` : `claim ${s.claim}` }),
      el("td", { text: s.when || whenFull(s.time) }),
      el("td", { class: "path", text: (s.names || []).join(", ") })))));
}

function renderExplanation(x) {
  const box = el("div", { class: "explanation", "data-status": x.status });
  box.append(el("dl", {},
    el("dt", { text: "verdict" }), el("dd", {}, badge(x.status === "warn" ? "warned" : x.status), " ", x.reason),
    el("dt", { text: "rule" }), el("dd", { text: `${x.rule} (needs ${x.needed})` }),
    el("dt", { text: "content" }), el("dd", { class: "mono", text: `${x.digest} (${x.size} bytes, version ${x.version})` }),
    x.not_counted && x.not_counted.length ? [el("dt", { text: "not counted" }), el("dd", { text: x.not_counted.join("; ") })] : null,
    x.would_satisfy ? [el("dt", { text: "would satisfy" }), el("dd", { text: x.would_satisfy })] : null,
  ));
  if (!("original" in x)) return box;
  const o = x.original;
  if (!o) {
    box.append(el("p", { class: "note", text: "No signed original: no ancestor along the edit graph is signed and no signed content shares fragments with it." }));
    return box;
  }
  const back = o.edits_back !== null && o.edits_back !== undefined ? `, ${o.edits_back} edit(s) back` : "";
  box.append(el("h4", { text: `Signed original (found by ${o.found_by}${back})` }),
    el("p", { class: "mono", text: `${o.digest} — ${o.size} bytes` + (o.version !== null ? `, version ${o.version}` : "") +
      `; shares ${o.shared_bytes} bytes in ${o.shared_fragments} fragment(s)` }),
    signatureRows(o.statements.map((s) => ({ ...s, when: whenFull(s.time) }))));
  box.append(el("h4", { text: `Difference (original → this file): ${x.diff_kind || "none"}` }));
  if (x.summary) {
    box.append(el("p", { text: `${x.summary.ranges} changed range(s): ${x.summary.changed} bytes changed, ` +
      `${x.summary.inserted} inserted, ${x.summary.deleted} deleted` }));
  }
  if (x.diff) box.append(renderDiff(x.diff, x.diff_kind));
  return box;
}

async function toggleExplanation(row, ev, colspan) {
  const next = row.nextElementSibling;
  if (next && next.classList.contains("expl-row")) { next.remove(); row.classList.remove("open"); return; }
  row.classList.add("open");
  const cell = el("td", { colspan, text: "explaining…" });
  row.after(el("tr", { class: "expl-row" }, cell));
  try {
    // The daemon explained it at the refusal (rate-limited); otherwise ask now.
    const url = `/api/explain?path=${q(ev.path)}` + (ev.version ? `&version=${ev.version}` : "");
    const x = ev.details || await getJSON(url);
    cell.textContent = "";
    cell.append(renderExplanation(x));
  } catch (err) {
    cell.textContent = "";
    if (ev.explanation) cell.append(el("pre", { class: "diff", text: ev.explanation }));
    cell.append(el("p", { class: "error", text: String(err.message || err) }));
  }
}

// -- live opens -------------------------------------------------------------------------------

const live = { rows: [], verdict: "", path: "" };

function eventRow(ev, { tbody, live: isLive }) {
  const tr = el("tr", {
    class: `ev v-${ev.verdict}` + (ev.verdict !== "allowed" ? " expandable" : ""),
    "data-verdict": ev.verdict, "data-path": ev.path, "data-seq": ev.seq ?? "",
  },
    el("td", { class: "time", title: whenFull(ev.time), text: when(ev.time) }),
    el("td", {}, badge(ev.verdict)),
    el("td", {}, fileLink(ev.path)),
    el("td", { text: ev.pid }),
    el("td", { class: "reason", text: ev.reason }));
  if (ev.verdict !== "allowed") {
    tr.addEventListener("click", (e) => {
      if (e.target.closest("a")) return;
      toggleExplanation(tr, ev, 5);
    });
  }
  if (isLive) tr.hidden = !matches(ev);
  tbody.prepend(tr);
  return tr;
}

function matches(ev) {
  return (!live.verdict || ev.verdict === live.verdict) && (!live.path || ev.path.includes(live.path));
}

function applyFilters() {
  live.verdict = document.getElementById("f-verdict").value;
  live.path = document.getElementById("f-path").value;
  let shown = 0;
  for (const tr of document.querySelectorAll("#opens > tr.ev")) {
    const ok = matches({ verdict: tr.dataset.verdict, path: tr.dataset.path });
    tr.hidden = !ok;
    const x = tr.nextElementSibling;
    if (x && x.classList.contains("expl-row")) x.hidden = !ok;
    shown += ok;
  }
  updateCount(shown);
}

function updateCount(shown) {
  const total = document.querySelectorAll("#opens > tr.ev").length;
  if (shown === undefined) shown = document.querySelectorAll("#opens > tr.ev:not([hidden])").length;
  document.getElementById("live-count").textContent = `${shown} of ${total} shown`;
}

function addOpens(items) {
  const tbody = document.getElementById("opens");
  for (const ev of items) eventRow(ev, { tbody, live: true });
  const rows = tbody.querySelectorAll("tr.ev");
  for (let i = MAX_ROWS; i < rows.length; i++) {
    const x = rows[i].nextElementSibling;
    if (x && x.classList.contains("expl-row")) x.remove();
    rows[i].remove();
  }
  updateCount();
}

function setStatus(state, text) {
  const s = document.getElementById("status");
  s.dataset.state = state;
  s.textContent = text;
}

function connectLive() {
  const source = new EventSource("/api/live");
  source.addEventListener("hello", () => setStatus("live", "live"));
  source.addEventListener("opens", (m) => addOpens(JSON.parse(m.data)));
  source.addEventListener("dropped", (m) => {
    const n = JSON.parse(m.data).count;
    setStatus("live", `live (${n} opens not shown: too many at once)`);
  });
  source.onerror = () => setStatus("down", "disconnected, retrying…");
}

// -- coverage ---------------------------------------------------------------------------------

function counters(pairs) {
  return (pairs || []).map(([name, n]) => `${name} (${n})`).join(", ");
}

// Widths through the CSSOM: the page's Content-Security-Policy forbids style attributes.
function bar(t) {
  const pct = t.files ? (100 * t.signed) / t.files : 0;
  const signed = el("div", { class: "bar-signed" });
  signed.style.width = `${pct}%`;
  const box = el("div", { class: "bar", title: `${pct.toFixed(1)}% signed` }, signed);
  if (t.refused) {
    const r = el("div", { class: "bar-refused" });
    r.style.width = `${(100 * t.refused) / t.files}%`;
    box.append(r);
  }
  return box;
}

function totalsBox(t, hasPolicy) {
  const item = (k, label) => el("div", { class: `total t-${k}`, "data-field": k },
    el("span", { class: "n", text: t[k] }), el("span", { class: "l", text: label }));
  return [item("files", "files"), item("signed", "signed"), item("unsigned", "unsigned"),
    item("labelled", "labelled"), hasPolicy ? item("refused", "would be refused") : null,
    t.pending ? item("pending", "digest not computed") : null,
    el("div", { class: "keys" }, el("div", {}, el("b", { text: "keys: " }), counters(t.keys) || "none"),
      el("div", {}, el("b", { text: "claims: " }), counters(t.claims) || "none"),
      t.labels.length ? el("div", {}, el("b", { text: "labels: " }), counters(t.labels)) : null)];
}

async function showCoverage(path) {
  const crumbs = document.getElementById("crumbs");
  const c = await load(crumbs, `/api/coverage?path=${q(path)}`);
  if (!c) return;
  const names = c.path.split("/").filter(Boolean);
  crumbs.append(el("a", { href: "#coverage=/", text: "/" }));
  names.forEach((n, i) => {
    const p = "/" + names.slice(0, i + 1).join("/");
    crumbs.append(i ? " / " : "", el("a", { href: `#coverage=${p}`, text: n }));
  });
  const total = document.getElementById("cov-total");
  total.textContent = "";
  total.dataset.path = c.path;
  total.append(...totalsBox(c.total, c.policy).filter(Boolean));
  const dirs = document.getElementById("cov-dirs");
  dirs.textContent = "";
  for (const d of c.dirs) {
    dirs.append(el("tr", { class: "dir", "data-path": d.path },
      el("td", {}, el("a", { href: `#coverage=${d.path}`, class: "path", text: d.name + "/" })),
      el("td", { "data-field": "files", text: d.files }),
      el("td", { class: "barcol" }, bar(d)),
      el("td", { "data-field": "signed", text: d.signed }),
      el("td", { "data-field": "unsigned", text: d.unsigned }),
      el("td", { "data-field": "labelled", text: d.labelled }),
      el("td", { "data-field": "refused", text: c.policy ? d.refused : "–" }),
      el("td", { class: "key", text: counters(d.keys) }),
      el("td", { text: counters(d.claims) })));
  }
  if (!c.dirs.length) dirs.append(el("tr", {}, el("td", { colspan: 9, class: "muted", text: "no subdirectories" })));
  const files = document.getElementById("cov-files");
  files.textContent = "";
  for (const f of c.files) {
    files.append(el("tr", { class: `file ${f.signed ? "signed" : "unsigned"}`, "data-path": f.path },
      el("td", {}, el("a", { href: `#file=${f.path}`, class: "path", text: f.name })),
      el("td", {}, f.status ? badge(f.status === "warn" ? "warned" : f.status) : el("span", { class: "muted", text: "–" })),
      el("td", { class: "key", text: f.signers.join(", ") || "unsigned" }),
      el("td", { text: f.claims.join(", ") }),
      el("td", { class: f.labels.length ? "label" : "", text: f.labels.join(", ") }),
      el("td", { class: "mono", title: f.digest || "", text: shortDigest(f.digest) })));
  }
  if (c.unlisted > 0) files.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: `${c.unlisted} more files not listed` })));
  if (!c.files.length) files.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "no files directly here" })));
}

// -- one file ---------------------------------------------------------------------------------

async function showFile(path) {
  const body = document.getElementById("file-body");
  const f = await load(body, `/api/file?path=${q(path)}`);
  if (!f) return;
  const dir = f.path.slice(0, f.path.lastIndexOf("/")) || "/";
  body.append(
    el("h2", { class: "path", text: f.path }),
    el("p", {}, el("a", { href: `#coverage=${dir}`, text: `coverage of ${dir}` })),
    el("dl", {},
      el("dt", { text: "digest" }), el("dd", { class: "mono", "data-field": "digest", text: f.digest || "not computed yet" }),
      el("dt", { text: "size" }), el("dd", { text: `${f.size} bytes, version ${f.version}` }),
      f.status ? [el("dt", { text: "verdict" }), el("dd", {}, badge(f.status === "warn" ? "warned" : f.status), " ", f.reason)] : null),
    el("h3", { text: "Statements over this content" }),
    signatureRows(f.signatures));
  if (f.status && f.status !== "allowed" && f.status !== "off") {
    const holder = el("div");
    body.append(el("button", { type: "button", onclick: async () => {
      holder.textContent = "explaining…";
      try { holder.textContent = ""; holder.append(renderExplanation(await getJSON(`/api/explain?path=${q(f.path)}`))); }
      catch (err) { holder.textContent = String(err.message || err); }
    } }, "Explain"), holder);
  }
  body.append(el("h3", { text: "Versions along the edit graph (newest first)" }));
  const rows = f.versions.map((v) => el("tr", { class: v.signatures.length ? "signed" : "" },
    el("td", { text: v.root ? "root (empty)" : v.id }),
    el("td", { text: v.when }),
    el("td", { text: v.size }),
    el("td", { class: "mono", title: v.digest || "", text: shortDigest(v.digest) }),
    el("td", { text: v.edit ? `fragments [${v.edit.start}, +${v.edit.removed}) → +${v.edit.added}` : "" }),
    el("td", { class: "key", text: v.signatures.map((s) => `${s.signer} (${s.label ? "label " + s.label : s.claim})`).join(", ") })));
  body.append(el("table", { class: "versions" },
    el("thead", {}, el("tr", {}, ["version", "created", "size", "digest", "edit from parent", "signed by"].map((h) => el("th", { text: h })))),
    el("tbody", {}, rows)));
  if (f.more_versions) body.append(el("p", { class: "muted", text: `${f.more_versions} older versions not shown` }));
}

// -- events log -------------------------------------------------------------------------------

async function showHistory() {
  const tbody = document.getElementById("history");
  tbody.textContent = "";
  try {
    const events = await getJSON("/api/events?limit=500");
    for (const ev of events) eventRow(ev, { tbody, live: false });
    if (!events.length) tbody.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "no events recorded" })));
  } catch (err) {
    tbody.append(el("tr", {}, el("td", { colspan: 5, class: "error", text: String(err.message || err) })));
  }
}

// -- the page ---------------------------------------------------------------------------------

function route() {
  const h = decodeURIComponent(location.hash.slice(1)) || "live";
  const [tab, arg] = h.includes("=") ? [h.slice(0, h.indexOf("=")), h.slice(h.indexOf("=") + 1)] : [h, ""];
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== tab;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === tab);
  if (tab === "coverage") showCoverage(arg || "/");
  else if (tab === "file") {
    const t = document.getElementById("file-tab");
    t.hidden = false;
    t.href = `#file=${arg}`;
    showFile(arg);
  } else if (tab === "events") showHistory();
}

async function start() {
  document.getElementById("f-verdict").addEventListener("change", applyFilters);
  document.getElementById("f-path").addEventListener("input", applyFilters);
  window.addEventListener("hashchange", route);
  try {
    const info = await getJSON("/api/info");
    document.getElementById("where").textContent =
      `store ${info.store}` + (info.mountpoint ? ` mounted at ${info.mountpoint}` : " (not mounted)") +
      ` · ${info.statements} statement(s)`;
    const p = info.policy;
    document.getElementById("policy").textContent = p
      ? `policy ${p.source}: mode ${p.mode}, default ${p.default}; trusted keys: ${p.trusted.join(", ") || "none"}`
      : "no policy";
    if (p && p.bundle) {
      const b = document.createElement("div");
      b.id = "bundle";
      b.textContent = (p.bundle.lines.length ? p.bundle.lines.join(" · ") : `bundle ${p.bundle.source}`) +
        (p.bundle.stale ? ` · STALE (on-stale ${p.bundle.on_stale}): ${p.bundle.stale}` : "");
      document.getElementById("policy").after(b);
    }
    if (info.live && !p) {
      const note = document.getElementById("live-off");
      note.textContent = "This mount has no policy (mount --policy FILE): opens are not judged, so none are listed.";
      note.hidden = false;
    }
    if (info.live) connectLive();
    else {
      document.getElementById("live-off").hidden = false;
      setStatus("off", "not mounted");
    }
  } catch (err) {
    setStatus("down", String(err.message || err));
  }
  route();
}

document.addEventListener("DOMContentLoaded", start);
