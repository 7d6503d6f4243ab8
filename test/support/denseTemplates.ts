/**
 * Templates whose steps depend on many earlier ones, for the edge-limit tests.
 */
import { MAX_TEMPLATE_EDGES, MAX_TEMPLATE_STEPS } from "../../broker/state/templates";

/** `steps` steps, each depending on up to `fanIn` of the steps just before it: steps * fanIn - fanIn * (fanIn + 1) / 2 edges. */
export function linkedSteps(
  steps: number,
  fanIn: number,
): { name: string; handler: string; depends_on: string[] }[] {
  return Array.from({ length: steps }, (_, i) => ({
    name: `s${i}`,
    handler: "h",
    depends_on: Array.from({ length: Math.min(i, fanIn) }, (_, j) => `s${i - 1 - j}`),
  }));
}

/** A template at the step limit with exactly MAX_TEMPLATE_EDGES edges plus `extra`. */
export function templateAtEdgeLimit(
  name: string,
  extra = 0,
): { namespace: string; name: string; version: string; steps: ReturnType<typeof linkedSteps> } {
  const steps = linkedSteps(MAX_TEMPLATE_STEPS, 10);
  let edges = steps.reduce((n, s) => n + s.depends_on.length, 0);
  // Top up from the last step backwards, one more parent each, until the count is exact.
  for (let i = steps.length - 1; edges < MAX_TEMPLATE_EDGES + extra; i--) {
    const s = steps[i]!;
    s.depends_on.push(`s${i - 1 - s.depends_on.length}`);
    edges++;
  }
  return { namespace: "bomb", name, version: "1", steps };
}
