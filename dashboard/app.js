// The stepbroker dashboard: plain ES modules, no build step. Views are
// rebuilt from the JSON API on every live tick (server-sent events read with
// fetch, so the token travels in a header, never in a URL).
import { drawDag } from "./dag.js";
import { age, badge, h, ms, s, short, table } from "./dom.js";

const STATES = ["pending", "in_progress", "complete", "error", "cancelled"];
const view = document.getElementById("view");
const liveBadge = document.getElementById("live");

// A token given as /#token=... is kept for this tab only and taken out of the address bar.
if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem("stepbroker-token", decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", `${location.pathname}#/`);
}
const token = () => sessionStorage.getItem("stepbroker-token");
const headers = (more = {}) => {
  const t = token();
  return t ? { ...more, Authorization: `Bearer ${t}` } : more;
};

async function api(path, init = {}) {
  const res = await fetch(path, { ...init, headers: headers(init.headers) });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error?.message ?? `${res.status} ${res.statusText}`);
  return body;
}

function post(path, body = {}) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function toast(text, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = bad ? "bad" : "";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (el.hidden = true), 5000);
}

async function act(what, fn) {
  try {
    await fn();
    toast(what);
    await render();
  } catch (e) {
    toast(`${what} failed: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ routing

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  return { path: path || "/", params: new URLSearchParams(query) };
}

let rendering = false;
let again = false;
/** Renders the current view; a tick that arrives meanwhile renders once more afterwards. */
async function render() {
  if (rendering) {
    again = true;
    return;
  }
  rendering = true;
  try {
    do {
      again = false;
      const { path, params } = route();
      for (const a of document.querySelectorAll("[data-nav]"))
        a.classList.toggle(
          "active",
          path.startsWith(`/${a.dataset.nav}`) || (path === "/" && a.dataset.nav === "overview"),
        );
      let content;
      try {
        if (path.startsWith("/task/")) content = await taskPage(path.slice(6));
        else if (path === "/tasks") content = await tasksPage(params);
        else if (path === "/pools") content = await poolsPage();
        else content = await overviewPage();
      } catch (e) {
        content = h("p", { class: "error-text" }, `Could not load: ${e.message}`);
      }
      keepInputs(() => view.replaceChildren(content));
    } while (again);
  } finally {
    rendering = false;
  }
}

/** Re-rendering must not eat what an operator is typing: keep values and focus of inputs by id. */
function keepInputs(swap) {
  const saved = new Map(
    [...view.querySelectorAll("input[id], textarea[id], select[id]")].map((el) => [el.id, el.value]),
  );
  const focused = document.activeElement?.id;
  swap();
  for (const [id, value] of saved) {
    const el = document.getElementById(id);
    if (el) el.value = value;
  }
  if (focused) document.getElementById(focused)?.focus();
}

// ------------------------------------------------------------------ overview

async function overviewPage() {
  const [tp, pools] = await Promise.all([api("/api/throughput?minutes=15"), api("/api/pools")]);
  const ready = tp.queue.reduce((n, q) => n + q.ready, 0);
  return h(
    "section",
    { id: "overview" },
    h("h1", {}, "Overview"),
    h(
      "p",
      {},
      `${pools.pools.length} pools connected · ${pools.pools.reduce((n, p) => n + p.in_flight, 0)} steps in flight · `,
      h("span", { "data-testid": "ready-total" }, String(ready)),
      " steps ready",
    ),
    h(
      "div",
      { class: "grid" },
      h(
        "div",
        {},
        h("h2", {}, "Attempts finished per minute (last 15 min)"),
        throughputChart(tp.throughput, tp.minutes),
      ),
      h("div", {}, h("h2", {}, "Ready steps over time (last 15 min)"), queueChart(tp.queue_history)),
    ),
    h("h2", {}, "Queue depth by handler"),
    table(
      ["handler", "ready", "oldest waiting"],
      tp.queue.map((q) =>
        h(
          "tr",
          {},
          h("td", {}, q.handler),
          h("td", { class: "num" }, q.ready),
          h("td", { class: "num" }, `${q.oldestAgeSeconds.toFixed(1)} s`),
        ),
      ),
      "no steps waiting",
    ),
  );
}

function throughputChart(rows, minutes) {
  const W = 480;
  const H = 140;
  const now = new Date();
  now.setSeconds(0, 0);
  const buckets = [];
  for (let i = minutes; i >= 0; i--)
    buckets.push({ t: now.getTime() - i * 60_000, complete: 0, error: 0, other: 0 });
  for (const r of rows) {
    const b = buckets.find((x) => x.t === Date.parse(r.minute));
    if (!b) continue;
    if (r.outcome === "complete" || r.outcome === "error") b[r.outcome] += r.count;
    else b.other += r.count;
  }
  const max = Math.max(1, ...buckets.map((b) => b.complete + b.error + b.other));
  const bw = (W - 30) / buckets.length;
  const svg = s("svg", { class: "chart", width: W, height: H, "data-testid": "throughput" });
  buckets.forEach((b, i) => {
    let y = H - 15;
    for (const k of ["complete", "error", "other"]) {
      const bh = ((H - 30) * b[k]) / max;
      if (bh > 0)
        svg.append(
          s(
            "rect",
            { class: `bar-${k}`, x: 25 + i * bw, y: y - bh, width: bw - 2, height: bh },
            s("title", {}, `${b[k]} ${k}`),
          ),
        );
      y -= bh;
    }
  });
  svg.append(
    s("text", { x: 2, y: 12 }, String(max)),
    s("text", { x: 25, y: H - 2 }, `-${minutes} min`),
    s("text", { x: W - 30, y: H - 2 }, "now"),
  );
  return svg;
}

function queueChart(points) {
  const W = 480;
  const H = 140;
  const svg = s("svg", { class: "chart", width: W, height: H });
  if (points.length < 2) {
    svg.append(s("text", { x: 10, y: 20 }, "collecting…"));
    return svg;
  }
  const max = Math.max(1, ...points.map((p) => p.ready));
  const t0 = Date.parse(points[0].at);
  const span = Math.max(1, Date.parse(points[points.length - 1].at) - t0);
  const xy = points.map(
    (p) => `${25 + ((W - 30) * (Date.parse(p.at) - t0)) / span},${H - 15 - ((H - 30) * p.ready) / max}`,
  );
  svg.append(
    s("polyline", { points: xy.join(" "), "data-testid": "queue-history" }),
    s("text", { x: 2, y: 12 }, String(max)),
  );
  return svg;
}

// ------------------------------------------------------------------ tasks

let templatesCache;

async function tasksPage(params) {
  const q = new URLSearchParams();
  for (const k of ["state", "template", "text", "before"]) if (params.get(k)) q.set(k, params.get(k));
  q.set("limit", params.get("limit") || "25");
  templatesCache ??= (await api("/api/templates")).templates;
  const page = await api(`/api/tasks?${q}`);
  const names = [...new Set(templatesCache.map((t) => `${t.namespace}/${t.name}`))];
  const go = (changes) => {
    const next = new URLSearchParams(params);
    for (const [k, v] of Object.entries(changes)) {
      if (v) next.set(k, v);
      else next.delete(k);
    }
    location.hash = `#/tasks?${next}`;
  };
  const form = h(
    "form",
    {
      class: "filters",
      onsubmit: (e) => {
        e.preventDefault();
        const f = new FormData(e.target);
        go({ state: f.get("state"), template: f.get("template"), text: f.get("text"), before: "" });
      },
    },
    h(
      "select",
      { name: "state", id: "f-state" },
      h("option", { value: "" }, "any state"),
      STATES.map((st) => h("option", { value: st, selected: params.get("state") === st }, st)),
    ),
    h(
      "select",
      { name: "template", id: "f-template" },
      h("option", { value: "" }, "any template"),
      names.map((n) => h("option", { value: n, selected: params.get("template") === n }, n)),
    ),
    h("input", {
      name: "text",
      id: "f-text",
      placeholder: "id, key or context text",
      value: params.get("text") ?? "",
    }),
    h("button", { type: "submit" }, "Filter"),
  );
  const rows = page.tasks.map((t) =>
    h(
      "tr",
      { "data-task": t.task_id },
      h("td", {}, h("a", { href: `#/task/${t.task_id}` }, t.task_id.slice(0, 13) + "…")),
      h("td", {}, `${t.template.namespace}/${t.template.name}@${t.template.version}`),
      h("td", {}, badge(t.state)),
      h("td", { class: "num" }, `${t.steps_done}/${t.steps_total}`),
      h("td", { class: "num", title: t.created_at }, age(t.created_at)),
      h("td", { class: "muted" }, t.idempotency_key ?? ""),
    ),
  );
  return h(
    "section",
    { id: "tasks" },
    h("h1", {}, "Tasks"),
    form,
    table(["task", "template", "state", "steps done", "age", "idempotency key"], rows, "no tasks match"),
    h(
      "div",
      { class: "pager" },
      params.get("before") ? h("button", { onclick: () => go({ before: "" }) }, "← Newest") : null,
      page.next
        ? h("button", { "data-testid": "older", onclick: () => go({ before: page.next }) }, "Older →")
        : null,
    ),
  );
}

async function taskPage(taskId) {
  const d = await api(`/api/tasks/${encodeURIComponent(taskId)}`);
  const t = d.task;
  const steps = t.steps ?? [];
  const running = t.state === "pending" || t.state === "in_progress";
  const explainByName = new Map(d.explain.map((e) => [e.name, e]));
  const stepRows = steps.map((st) => {
    const actions = [];
    if (st.state === "error")
      actions.push(
        h(
          "button",
          {
            "data-action": "retry",
            onclick: () => act(`retried ${st.name}`, () => post(`/api/steps/${st.step_id}/retry`)),
          },
          "Retry",
        ),
      );
    // a pending step can be resolved only when a failed ancestor blocks it (the server checks it too)
    if (
      st.state === "error" ||
      (st.state === "pending" && t.state === "error" && explainByName.get(st.name)?.blockedBy === "parents")
    )
      actions.push(resolveForm(st));
    return h(
      "tr",
      { "data-step-row": st.name },
      h("td", {}, st.name),
      h("td", {}, st.handler),
      h("td", {}, badge(st.state)),
      h("td", { class: "num" }, `${st.attempts}/${st.max_attempts}`),
      h(
        "td",
        {},
        h("pre", {}, st.output !== undefined ? short(st.output, 400) : st.error ? short(st.error, 400) : ""),
      ),
      h("td", {}, actions),
    );
  });
  const notReady = d.explain.filter(
    (e) => e.blockedBy !== null && !["complete", "resolved_manually", "cancelled"].includes(e.state),
  );
  return h(
    "section",
    { id: "task", "data-task": t.task_id },
    h("h1", {}, `Task ${t.task_id} `, badge(t.state)),
    h(
      "p",
      {},
      `${t.template.namespace}/${t.template.name}@${t.template.version} · created ${age(t.created_at)} ago`,
      t.finished_at ? ` · finished ${age(t.finished_at)} ago` : "",
      " ",
      running
        ? h(
            "button",
            { class: "danger", "data-action": "cancel-task", onclick: () => confirmCancel(t.task_id) },
            "Cancel task",
          )
        : null,
    ),
    t.error ? h("pre", { class: "error-text" }, short(t.error, 2000)) : null,
    h("h2", {}, "Steps"),
    h(
      "div",
      { id: "dag" },
      drawDag(steps, d.edges, (st) =>
        document.querySelector(`[data-step-row="${CSS.escape(st.name)}"]`)?.scrollIntoView(),
      ),
    ),
    table(["step", "handler", "state", "attempts", "output / error", ""], stepRows),
    notReady.length ? h("h2", {}, "Why steps are not ready") : null,
    notReady.length
      ? table(
          ["step", "state", "blocked by", "conditions"],
          notReady.map((e) =>
            h(
              "tr",
              {},
              h("td", {}, e.name),
              h("td", {}, badge(e.state)),
              h("td", {}, e.blockedBy ?? ""),
              h(
                "td",
                { class: "muted" },
                e.conditions
                  .map((c) => `${c.ok ? "✓" : "✗"} ${c.name}${c.detail ? `: ${c.detail}` : ""}`)
                  .join(" · "),
              ),
            ),
          ),
        )
      : null,
    h("h2", {}, "Attempts"),
    table(
      ["step", "#", "pool", "started", "duration", "outcome", "error"],
      d.attempts.map((a) =>
        h(
          "tr",
          {},
          h("td", {}, a.stepName),
          h("td", { class: "num" }, a.attempt),
          h("td", {}, a.poolId ?? ""),
          h("td", { title: a.startedAt }, `${age(a.startedAt)} ago`),
          h("td", { class: "num" }, ms(a.durationMs)),
          h("td", {}, a.outcome ? badge(a.outcome) : h("span", { class: "muted" }, "running")),
          h("td", {}, a.error ? h("pre", {}, short(a.error, 300)) : ""),
        ),
      ),
      "no attempts yet",
    ),
    h("h2", {}, "Transitions"),
    h(
      "ol",
      { class: "timeline" },
      d.transitions.map((tr) =>
        h(
          "li",
          {},
          h("span", { class: "muted" }, new Date(tr.at).toLocaleTimeString()),
          " ",
          tr.stepName ?? "(task)",
          `: ${tr.from ?? "∅"} → ${tr.to} `,
          h("span", { class: "muted" }, tr.event),
        ),
      ),
    ),
  );
}

function resolveForm(st) {
  const id = `resolve-${st.step_id}`;
  return h(
    "span",
    { class: "resolve" },
    h("textarea", { id, placeholder: '{"output": …} JSON' }),
    h(
      "button",
      {
        "data-action": "resolve",
        onclick: () => {
          const text = document.getElementById(id).value.trim();
          let output;
          try {
            output = text === "" ? null : JSON.parse(text);
          } catch (e) {
            toast(`the output is not JSON: ${e.message}`, true);
            return;
          }
          act(`resolved ${st.name}`, () => post(`/api/steps/${st.step_id}/resolve`, { output }));
        },
      },
      "Resolve",
    ),
  );
}

function confirmCancel(taskId) {
  if (!window.confirm(`Cancel task ${taskId}? Its running steps are told to stop.`)) return;
  act("task cancelled", () => post(`/api/tasks/${taskId}/cancel`));
}

// ------------------------------------------------------------------ pools

async function poolsPage() {
  const { pools } = await api("/api/pools");
  return h(
    "section",
    { id: "pools" },
    h("h1", {}, "Pools"),
    table(
      [
        "pool",
        "sdk",
        "handlers",
        "capacity",
        "credit",
        "in flight",
        "heartbeat age",
        "draining",
        "quarantined",
      ],
      pools.map((p) =>
        h(
          "tr",
          { "data-pool": p.pool_id },
          h("td", {}, p.pool_id),
          h("td", {}, `${p.sdk.language} ${p.sdk.version ?? ""}`),
          h("td", {}, p.handlers.join(", ")),
          h("td", { class: "num" }, p.capacity),
          h("td", { class: "num" }, p.credit),
          h("td", { class: "num" }, p.in_flight),
          h("td", { class: "num" }, ms(p.last_seen_ms_ago)),
          h("td", {}, p.draining === null ? "–" : p.draining ? "yes" : "no"),
          h("td", {}, p.quarantined === null ? "–" : p.quarantined ? "yes" : "no"),
        ),
      ),
      "no pools connected",
    ),
  );
}

// ------------------------------------------------------------------ live

/** Reads /api/events as a stream; each tick re-renders. Reconnects after a pause when the stream ends. */
async function live() {
  for (;;) {
    try {
      const res = await fetch("/api/events", { headers: headers() });
      if (!res.ok || !res.body) throw new Error(`${res.status}`);
      liveBadge.textContent = "live";
      liveBadge.className = "live on";
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (/^event: tick$/m.test(frame)) void render();
        }
      }
    } catch {
      // the broker went away or refused: show it, and try again
    }
    liveBadge.textContent = "offline";
    liveBadge.className = "live off";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

window.addEventListener("hashchange", () => void render());
void render();
void live();
