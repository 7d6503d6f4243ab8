/**
 * Shared shapes for the peer job-queue benchmarks (graphile-worker, pg-boss)
 * that `npm run bench` sets beside stepbroker's own figures.
 */

/** One peer's measured drain throughput. */
export interface PeerResult {
  /** Library name, e.g. "graphile-worker". */
  name: string;
  /** Installed library version (from its package.json). */
  version: string;
  /** Jobs completed within the time bound (equals the requested count unless the bound hit). */
  jobs: number;
  /** Seconds from starting the worker until the last job was seen completed (or the bound). */
  seconds: number;
  jobsPerSecond: number;
  /** The settings used, stated plainly. */
  settings: string;
  /** The same settings as fields, for --json readers and the tuning runs. */
  options: Record<string, string | number | boolean>;
  /**
   * CPU time per completed job (µs, user + system) over the timed drain: the
   * peer's worker runs in this process, so `node` is this process's; `server`
   * is the PostgreSQL server's, when it is local. The drain poll that watches
   * for the end (one count a few ms) is in both.
   */
  nodeCpuMicrosPerJob?: number;
  serverCpuMicrosPerJob?: number;
}

/** Options every peer measurement accepts. */
export interface PeerOptions {
  /** postgres:// URL; the peer creates (and first drops) its own schema there. */
  databaseUrl: string;
  /** How many trivial jobs to enqueue before timing the drain. */
  jobs: number;
  /** Upper bound on the timed drain, in seconds. */
  maxSeconds: number;
  /** Override the peer's tuned concurrency (graphile-worker: concurrent jobs; pg-boss: number of work() loops). */
  concurrency?: number;
  /** Reads the database server's CPU time in µs (bench/harness.ts serverCpuMicros), when it is local. */
  serverCpu?: () => number | undefined;
  log?: (line: string) => void;
}
