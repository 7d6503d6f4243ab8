// Draws a task's steps as a DAG in SVG: columns by depth (the longest path
// from a root), steps coloured by state, an edge from each parent to its child.
import { s } from "./dom.js";

const W = 150;
const H = 34;
const GAP_X = 60;
const GAP_Y = 18;

export function drawDag(steps, edges, onSelect) {
  const byName = new Map(steps.map((st) => [st.name, st]));
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    if (seen.has(name)) return 0; // a cycle cannot be stored; guard anyway
    seen.add(name);
    const parents = byName.get(name)?.depends_on ?? [];
    const d = parents.length === 0 ? 0 : 1 + Math.max(...parents.map((p) => depthOf(p, seen)));
    depth.set(name, d);
    return d;
  };
  const columns = [];
  for (const st of steps) {
    const d = depthOf(st.name);
    (columns[d] ??= []).push(st.name);
  }
  const pos = new Map();
  columns.forEach((names, x) =>
    names.forEach((name, y) => pos.set(name, { x: 10 + x * (W + GAP_X), y: 10 + y * (H + GAP_Y) })),
  );
  const width = 20 + columns.length * (W + GAP_X) - GAP_X;
  const height = 20 + Math.max(1, ...columns.map((c) => c.length)) * (H + GAP_Y) - GAP_Y;
  const svg = s("svg", { class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  for (const e of edges) {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + W;
    const y1 = a.y + H / 2;
    const x2 = b.x;
    const y2 = b.y + H / 2;
    const mid = (x1 + x2) / 2;
    svg.append(
      s("path", {
        d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
        "data-edge": `${e.from}>${e.to}`,
      }),
    );
  }
  for (const st of steps) {
    const p = pos.get(st.name);
    const label = st.name.length > 20 ? `${st.name.slice(0, 19)}…` : st.name;
    svg.append(
      s(
        "g",
        {
          class: `step state-${st.state}`,
          "data-step": st.name,
          "data-state": st.state,
          transform: `translate(${p.x},${p.y})`,
          onclick: () => onSelect?.(st),
          style: "cursor: pointer",
        },
        s("title", {}, `${st.name} (${st.handler}): ${st.state}`),
        s("rect", { width: W, height: H }),
        s("text", { x: 8, y: 21 }, label),
      ),
    );
  }
  return svg;
}
