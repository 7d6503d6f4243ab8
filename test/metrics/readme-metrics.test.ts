/**
 * The README's metrics table names every metric a broker exposes, spelled out
 * (an operator greps for the name they see in Prometheus), and names none
 * that does not exist.
 */
import { strict as assert } from "node:assert";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { BrokerMetrics } from "../../broker/metrics/BrokerMetrics";

const README = readFileSync(join(import.meta.dirname, "..", "..", "README.md"), "utf8");

describe("README: the metrics table", () => {
  it("documents every metric BrokerMetrics registers, and only those", async () => {
    const metrics = new BrokerMetrics({ sources: { pools: () => [], queueDepth: async () => [] } });
    const names = (await metrics.registry.getMetricsAsJSON()).map((m) => m.name);
    const ours = names.filter((n) => n.startsWith("stepbroker_"));
    assert.ok(ours.length >= 19, `the broker's own metrics are registered: ${ours.join(", ")}`);
    const missing = ours.filter((n) => !README.includes(`\`${n}\``));
    assert.deepEqual(missing, [], "every metric name appears in README.md, in backticks");
    const documented = [...README.matchAll(/`(stepbroker_[a-z_]+)`/g)].map((m) => m[1]!);
    const unknown = [...new Set(documented)].filter((n) => !ours.includes(n));
    assert.deepEqual(unknown, [], "the README names no metric that does not exist");
    const others = names.filter((n) => !n.startsWith("stepbroker_"));
    assert.ok(others.length > 0, "the process metrics are on by default");
    for (const n of others) assert.match(n, /^(process|nodejs)_/, `${n} is covered by process_* / nodejs_*`);
  });
});
