// Small DOM helpers. Everything the broker sends (names, errors, outputs) is
// untrusted text: it is only ever set as textContent or an attribute, never as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

/** h("td", { class: "num" }, "3") — children are nodes or text; null/undefined are skipped. */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements. */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function badge(state) {
  return h("span", { class: `badge ${state}`, "data-state": state }, state);
}

/** "3 s", "4 min", "2 h" since an ISO time. */
export function age(iso, now = Date.now()) {
  if (!iso) return "";
  const sec = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (sec < 90) return `${Math.round(sec)} s`;
  if (sec < 5400) return `${Math.round(sec / 60)} min`;
  if (sec < 172800) return `${Math.round(sec / 3600)} h`;
  return `${Math.round(sec / 86400)} d`;
}

export function ms(n) {
  if (n === null || n === undefined) return "";
  return n < 1000 ? `${Math.round(n)} ms` : `${(n / 1000).toFixed(1)} s`;
}

/** JSON shortened for a table cell. */
export function short(value, max = 200) {
  if (value === undefined) return "";
  const t = JSON.stringify(value);
  return t.length > max ? `${t.slice(0, max)}…` : t;
}

export function table(headers, rows, empty = "nothing to show") {
  if (rows.length === 0) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    {},
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headers.map((x) => h("th", {}, x)),
      ),
    ),
    h("tbody", {}, rows),
  );
}
