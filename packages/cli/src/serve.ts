/**
 * `cowstack serve`: open the store (recovering it if needed), export every volume (read-write) and
 * snapshot (read-only) over NBD on a unix socket and/or TCP, accept operations on the control socket,
 * optionally expose Prometheus metrics, and on SIGINT/SIGTERM stop cleanly: finish requests in flight,
 * disconnect clients, write a checkpoint, release the store. With `tls` the NBD servers offer (on) or
 * demand (require) STARTTLS; their URIs are then nbds:// when TLS is required.
 */
import { setFlagsFromString } from 'node:v8';
import { NbdServer, type NbdAddress, type TlsOptions } from '@cowstack/nbd';
import { type RetentionPolicy, Store, StoreExports } from '@cowstack/core';
import { ControlServer, removeServeRecord, writeServeRecord } from './control.js';
import { Metrics } from './metrics.js';
import { openNotes } from './open-notes.js';

export interface ServeOptions {
  readonly socket?: string;
  readonly socketMode: number;
  /** TCP port; undefined with a socket means "no TCP". */
  readonly port?: number;
  readonly bind: string;
  readonly metrics?: { host: string; port: number };
  readonly maxConnections?: number;
  /** TLS for the NBD servers (default off); credentials are read before any client connects. */
  readonly tls?: TlsOptions;
  /** Set this retention policy before serving. */
  readonly retain?: RetentionPolicy;
  /** Checkpoint after this many bytes of write data (the store's checkpointEveryPayloadBytes). */
  readonly checkpointEveryBytes?: number;
  readonly verbose: boolean;
  readonly log: (line: string) => void;
  /** Resolves when the server should stop (a signal). */
  readonly stopSignal: Promise<string>;
  readonly onProgress?: (phase: string, done: number, total: number) => void;
}

const loopbackHosts = new Set(['127.0.0.1', '::1', 'localhost']);

/**
 * How far V8 lets the old generation grow past what survived the last full collection before it
 * starts the next one (V8's `--heap-growing-percent`; 150 lets it reach 2.5 times that). The
 * server's live heap is small (10-15 MB) and requests allocate fast; V8's own sizing put the limit
 * within one young generation (16 MiB) of the live heap, so under 4k random writes it started a
 * full collection every 50-100 ms. With 150 (depth 4, 45 s of 4k random writes): 66 full
 * collections instead of 429, RSS 173-188 MiB throughout; larger values cut the collections further
 * without a measurable gain and let RSS climb more (BENCHMARKS.md). V8 reads the flag whenever it
 * sizes the heap, so setting it after start-up works.
 */
export const serveHeapGrowingPercent = 150;

/** The URI of an address; `nbds` when clients must use TLS. */
export function nbdUri(address: NbdAddress, tlsRequired = false): string {
  const scheme = tlsRequired ? 'nbds' : 'nbd';
  if ('socketPath' in address) return `${scheme}+unix:///?socket=${address.socketPath}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `${scheme}://${host}:${address.port}`;
}

export async function serve(dir: string, options: ServeOptions): Promise<void> {
  setFlagsFromString(`--heap-growing-percent=${serveHeapGrowingPercent}`);
  const metrics = options.metrics !== undefined ? new Metrics() : undefined;
  if (metrics !== undefined && options.metrics !== undefined) {
    const at = await metrics.listen(options.metrics.host, options.metrics.port);
    options.log(`metrics on http://${at.host.includes(':') ? `[${at.host}]` : at.host}:${at.port}/metrics`);
  }
  const store = await Store.open(dir, {
    onProgress: (phase, done, total) => {
      metrics?.replayEvents.set(done);
      metrics?.replayTotal.set(total);
      options.onProgress?.(phase, done, total);
    },
    checkpointEveryPayloadBytes: options.checkpointEveryBytes,
  });
  if (options.retain !== undefined) await store.setRetention(options.retain);
  const report = store.openReport;
  if (report.eventsReplayed > 0) {
    options.log(`recovered: replayed ${report.eventsReplayed} events after checkpoint seq ${report.checkpointSeq}, re-applied ${report.writesReapplied} writes in ${report.durationMs.toFixed(0)} ms`);
  }
  for (const skipped of report.checkpointsSkipped) options.log(`recovered: skipped the damaged checkpoint at seq ${skipped.seq} (${skipped.reason})`);
  for (const note of openNotes(report)) options.log(`recovered: ${note}`);
  metrics?.attach(store);
  if (options.verbose) store.checkpoints$.subscribe((c) => options.log(`checkpoint at seq ${c.seq} (${c.reason}) in ${c.durationMs.toFixed(0)} ms`));
  const provider = new StoreExports(store);
  const servers: NbdServer[] = [];
  const tlsMode = options.tls?.mode ?? 'off';
  const uri = (address: NbdAddress): string => nbdUri(address, tlsMode === 'require');
  const addresses: NbdAddress[] = [];
  const control = new ControlServer(store);
  const stopAll = async (): Promise<void> => {
    await Promise.all(servers.map((s) => s.close()));
    await control.close();
    removeServeRecord(store.dir);
    await metrics?.close();
    await store.close();
  };
  try {
    const makeServer = (): NbdServer => {
      const server = new NbdServer({
        provider,
        maxConnections: options.maxConnections,
        tls: options.tls,
        log: options.verbose ? options.log : () => {},
        onRequest: metrics?.onRequest,
      });
      servers.push(server);
      return server;
    };
    if (options.socket !== undefined) addresses.push(await makeServer().listen({ socketPath: options.socket, socketMode: options.socketMode }));
    if (options.port !== undefined) addresses.push(await makeServer().listen({ port: options.port, host: options.bind }));
    await control.listen();
    writeServeRecord(store.dir, { pid: process.pid, controlSocket: control.socketPath, exports: addresses.map(uri), startedAt: new Date().toISOString() });
  } catch (err) {
    await stopAll();
    throw err;
  }
  if (options.port !== undefined && !loopbackHosts.has(options.bind)) {
    if (tlsMode === 'off') options.log(`warning: serving on ${options.bind} without TLS: anyone who can reach this address can read and write every volume`);
    else if (tlsMode === 'on') options.log(`warning: serving on ${options.bind} with TLS optional (--tls on): a client that does not ask for TLS reads and writes in plaintext; --tls require refuses it`);
  }
  if (options.tls !== undefined && options.tls.mode !== 'off') options.log(`TLS ${options.tls.mode} (${options.tls.credentials.kind === 'psk' ? `PSK from ${options.tls.credentials.pskFile}` : 'x509'})`);
  const names = provider.list().map((e) => e.name);
  options.log(`serving ${store.dir} (${names.length} exports: ${names.join(', ')}) on ${addresses.map(uri).join(' and ')}`);
  if (metrics !== undefined) {
    const timer = setInterval(() => metrics.connections.set(servers.reduce((n, s) => n + s.connections, 0)), 1000);
    timer.unref();
  }
  const signal = await options.stopSignal;
  options.log(`${signal}: stopping (finishing requests in flight, writing a checkpoint)`);
  await stopAll();
  options.log(`stopped; checkpoint at seq ${store.lastSeq}`);
}
