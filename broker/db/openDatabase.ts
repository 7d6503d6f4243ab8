/**
 * Opens stepbroker's database: the server named by DATABASE_URL, or else an
 * embedded PostgreSQL in a local data directory. Every connection has its
 * search_path set to one schema, so the SQL stays unqualified and several
 * stepbroker installations (or test files) can share one database.
 */
import path from "node:path";
import pg from "pg";
import { type EmbeddedServer, runningEmbeddedUrl, startEmbeddedPostgres } from "./embedded";
import { assertIdentifier } from "./identifiers";
import { type Logger, silentLogger } from "./logger";

export interface OpenDatabaseOptions {
  /**
   * A postgres:// URL. Default: process.env.DATABASE_URL. When neither is set
   * (or this is ""), an embedded server is started in dataDir.
   */
  databaseUrl?: string;
  /** Embedded server's data directory. Default: <cwd>/.stepbroker/pgdata. */
  dataDir?: string;
  /** Port number in the embedded server's socket name (it opens no TCP port). Default: 5432. */
  port?: number;
  /** Schema holding stepbroker's tables. Default: "stepbroker". */
  schema?: string;
  /** Most pooled connections. Default: 10. */
  poolSize?: number;
  logger?: Logger;
}

export interface Database {
  readonly pool: pg.Pool;
  readonly schema: string;
  /** URL of the server (without the schema setting). */
  readonly url: string;
  /** True when this process started the server (it stops it on close). */
  readonly embedded: boolean;
  readonly logger: Logger;
  /** A new, unconnected client with the same settings (for LISTEN or migrations). */
  newClient(): pg.Client;
  close(): Promise<void>;
}

export const DEFAULT_SCHEMA = "stepbroker";

/** Connection settings for the schema: the only place the schema name meets SQL is this checked `options` string. */
export function connectionConfig(url: string, schema: string): pg.ClientConfig {
  return { connectionString: url, options: `-c search_path=${assertIdentifier(schema, "schema")}` };
}

export async function openDatabase(options: OpenDatabaseOptions = {}): Promise<Database> {
  const logger = options.logger ?? silentLogger;
  const schema = assertIdentifier(options.schema ?? DEFAULT_SCHEMA, "schema");
  const givenUrl = options.databaseUrl ?? process.env.DATABASE_URL;

  let server: EmbeddedServer | undefined;
  let url: string;
  if (givenUrl !== undefined && givenUrl !== "") {
    url = givenUrl;
  } else {
    const dataDir = options.dataDir ?? path.join(process.cwd(), ".stepbroker", "pgdata");
    const running = await runningEmbeddedUrl(dataDir);
    if (running !== undefined) {
      // Another process (a running broker) owns this server: use it, and leave it running on close.
      logger.info(
        { dataDir },
        "using the embedded PostgreSQL another stepbroker process runs in this data directory",
      );
      url = running;
    } else {
      server = await startEmbeddedPostgres({
        dataDir,
        ...(options.port !== undefined ? { port: options.port } : {}),
        logger,
      });
      url = server.url;
    }
  }

  const config = connectionConfig(url, schema);
  const pool = new pg.Pool({ ...config, max: options.poolSize ?? 10 });
  let closed = false;
  // An idle client whose server connection breaks emits here; without a listener the process would crash.
  // Log the message and code only: the error carries the whole client object.
  pool.on("error", (err) => {
    const code = (err as { code?: string }).code;
    // pool.end() does not wait for the clients' goodbyes, so stopping our own server right after
    // can terminate (57P01) a connection still saying it: expected, not worth a warning.
    if (closed && server !== undefined && code === "57P01") return;
    logger.warn({ err: { message: err.message, code } }, "idle database connection failed");
  });

  return {
    pool,
    schema,
    url,
    embedded: server !== undefined,
    logger,
    newClient: () => new pg.Client(config),
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      await pool.end();
      await server?.stop();
    },
  };
}
