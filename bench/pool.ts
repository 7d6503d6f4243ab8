/**
 * The benchmark's handler pool, a separate process so broker and pool each
 * get a core: `noop` returns null; `stamp` returns the time the step arrived
 * (ms since the epoch, sub-millisecond), for parent-to-child latency.
 *   node --import tsx bench/pool.ts <endpoint> <capacity>
 */
import { pino } from "pino";
import { HandlerPool } from "../handlers-node";

const [endpoint = "tcp://127.0.0.1:5555", capacity = "256"] = process.argv.slice(2);
const pool = new HandlerPool({
  endpoint,
  capacity: Number(capacity),
  poolId: `bench-${process.pid}`,
  logger: pino({ level: process.env.BENCH_POOL_LOG_LEVEL ?? "warn" }),
});
pool.handle("noop", async () => null);
pool.handle("stamp", async () => ({ arrived_at: performance.timeOrigin + performance.now() }));
await pool.start();
process.stdout.write(`READY ${pool.poolId}\n`);
const stop = () => void pool.close({ drainMs: 1000 });
process.once("SIGTERM", stop);
process.once("SIGINT", stop);
