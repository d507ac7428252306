// Building the page from data: elements and text nodes only. Nothing that comes from the
// API is ever parsed as HTML (no innerHTML), so job output, names and reasons stay text.

/** An element: h("a", {href: "#/jobs", class: "x"}, "text", child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** 1536 -> "1.5 KiB". */
export function bytes(n) {
  if (n === null || n === undefined) return "—";
  let value = Number(n);
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(value < 10 ? 1 : 0) : value} ${UNITS[unit]}`;
}

/** Seconds -> "4.2 s", "3 min 5 s", "2 h 10 min". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, seconds);
  if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  const two = (big, bigUnit, small, smallUnit) => (small ? `${big} ${bigUnit} ${small} ${smallUnit}` : `${big} ${bigUnit}`);
  if (s < 3600) return two(Math.floor(s / 60), "min", Math.floor(s % 60), "s");
  if (s < 86400) return two(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "min");
  return two(Math.floor(s / 86400), "d", Math.floor((s % 86400) / 3600), "h");
}

/** An API timestamp -> milliseconds since the epoch (naive ones are UTC). */
export function parseTime(text) {
  if (!text) return null;
  const zoned = /[zZ]|[+-]\d\d:?\d\d$/.test(text) ? text : `${text}Z`;
  const ms = Date.parse(zoned);
  return Number.isNaN(ms) ? null : ms;
}

/** A <time> showing how long ago `text` was, with the exact time as its title. */
export function ago(text) {
  const ms = parseTime(text);
  if (ms === null) return "—";
  const iso = new Date(ms).toISOString();
  return h("time", { datetime: iso, title: iso }, `${duration((Date.now() - ms) / 1000)} ago`);
}

/** Seconds between two API timestamps (the second defaults to now). */
export function between(start, end) {
  const a = parseTime(start);
  if (a === null) return null;
  const b = end ? parseTime(end) : Date.now();
  return b === null ? null : (b - a) / 1000;
}

/** A state badge: the text says the state, the colour only repeats it. */
export function badge(state) {
  return h("span", { class: `badge state-${String(state).replace(/[^a-z_]/g, "")}` }, state);
}

/** A <dl> of [term, value] pairs, skipping empty values. */
export function details(pairs) {
  const dl = h("dl", { class: "details" });
  for (const [term, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    dl.append(h("dt", {}, term), h("dd", {}, value));
  }
  return dl;
}

/** A table: caption, column headers, rows of cells (each a node, text or [cell, attrs]). */
export function table(caption, headers, rows, { empty = "Nothing here.", id } = {}) {
  const body = h("tbody");
  for (const row of rows) {
    body.append(h("tr", {}, row.map((cell) => h("td", {}, cell))));
  }
  if (!rows.length) {
    body.append(h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, empty)));
  }
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { id },
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
      body,
    ),
  );
}

/** A meter of `used` out of `total` with its numbers as text. */
export function meter(label, used, total, format = (v) => String(v)) {
  if (used === null || used === undefined) return "—";
  const text = total ? `${format(used)} / ${format(total)}` : format(used);
  const m = h("meter", { min: 0, max: total || 1, value: used, "aria-label": label }, text);
  return h("span", { class: "meter" }, m, " ", text);
}
