/**
 * `cowstack serve`: open the store (recovering it if needed), export every volume (read-write) and
 * snapshot (read-only) over NBD on a unix socket and/or TCP, accept operations on the control socket,
 * optionally expose Prometheus metrics, and on SIGINT/SIGTERM stop cleanly: finish requests in flight,
 * disconnect clients, write a checkpoint, release the store.
 */
import { NbdServer, type NbdAddress } from '@cowstack/nbd';
import { Store, StoreExports } from '@cowstack/core';
import { ControlServer, removeServeRecord, writeServeRecord } from './control.js';
import { Metrics } from './metrics.js';

export interface ServeOptions {
  readonly socket?: string;
  readonly socketMode: number;
  /** TCP port; undefined with a socket means "no TCP". */
  readonly port?: number;
  readonly bind: string;
  readonly metrics?: { host: string; port: number };
  readonly maxConnections?: number;
  readonly verbose: boolean;
  readonly log: (line: string) => void;
  /** Resolves when the server should stop (a signal). */
  readonly stopSignal: Promise<string>;
  readonly onProgress?: (phase: string, done: number, total: number) => void;
}

const loopbackHosts = new Set(['127.0.0.1', '::1', 'localhost']);

export function nbdUri(address: NbdAddress): string {
  if ('socketPath' in address) return `nbd+unix:///?socket=${address.socketPath}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}`;
}

export async function serve(dir: string, options: ServeOptions): Promise<void> {
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
  });
  const report = store.openReport;
  if (report.eventsReplayed > 0) {
    options.log(`recovered: replayed ${report.eventsReplayed} events after checkpoint seq ${report.checkpointSeq}, re-applied ${report.writesReapplied} writes in ${report.durationMs.toFixed(0)} ms`);
  }
  metrics?.attach(store);
  const provider = new StoreExports(store);
  const servers: NbdServer[] = [];
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
        log: options.verbose ? options.log : () => {},
        onRequest: metrics?.onRequest,
      });
      servers.push(server);
      return server;
    };
    if (options.socket !== undefined) addresses.push(await makeServer().listen({ socketPath: options.socket, socketMode: options.socketMode }));
    if (options.port !== undefined) addresses.push(await makeServer().listen({ port: options.port, host: options.bind }));
    await control.listen();
    writeServeRecord(store.dir, { pid: process.pid, controlSocket: control.socketPath, exports: addresses.map(nbdUri), startedAt: new Date().toISOString() });
  } catch (err) {
    await stopAll();
    throw err;
  }
  if (options.port !== undefined && !loopbackHosts.has(options.bind)) {
    options.log(`warning: serving on ${options.bind} without TLS: anyone who can reach this address can read and write every volume`);
  }
  const names = provider.list().map((e) => e.name);
  options.log(`serving ${store.dir} (${names.length} exports: ${names.join(', ')}) on ${addresses.map(nbdUri).join(' and ')}`);
  if (metrics !== undefined) {
    const timer = setInterval(() => metrics.connections.set(servers.reduce((n, s) => n + s.connections, 0)), 1000);
    timer.unref();
  }
  const signal = await options.stopSignal;
  options.log(`${signal}: stopping (finishing requests in flight, writing a checkpoint)`);
  await stopAll();
  options.log(`stopped; checkpoint at seq ${store.lastSeq}`);
}
