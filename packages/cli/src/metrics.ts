/**
 * Prometheus metrics for `serve --metrics ADDR:PORT` (prom-client): NBD requests, bytes and latency
 * per command, connections, journal appends and group-commit batch sizes, checkpoints (by reason) and
 * their duration, replay progress at startup, and the layer tree's size. Served at http://ADDR:PORT/metrics.
 */
import { createServer, type Server } from 'node:http';
import type { Store } from '@cowstack/core';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

export class Metrics {
  readonly registry = new Registry();
  private readonly requests = new Counter({ name: 'cowstack_nbd_requests_total', help: 'NBD requests answered', labelNames: ['command'], registers: [this.registry] });
  private readonly bytes = new Counter({ name: 'cowstack_nbd_request_bytes_total', help: 'Bytes requested by NBD commands', labelNames: ['command'], registers: [this.registry] });
  private readonly latency = new Histogram({
    name: 'cowstack_nbd_request_duration_seconds',
    help: 'NBD request latency',
    labelNames: ['command'],
    buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [this.registry],
  });
  readonly connections = new Gauge({ name: 'cowstack_nbd_connections', help: 'Open NBD connections', registers: [this.registry] });
  private readonly appends = new Counter({ name: 'cowstack_journal_appends_total', help: 'Events appended to the journal', registers: [this.registry] });
  private readonly batches = new Counter({ name: 'cowstack_journal_batches_total', help: 'Group-commit batches written', labelNames: ['sync'], registers: [this.registry] });
  private readonly batchRecords = new Histogram({
    name: 'cowstack_journal_batch_records',
    help: 'Events per group-commit batch',
    buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024],
    registers: [this.registry],
  });
  private readonly batchSeconds = new Histogram({
    name: 'cowstack_journal_batch_duration_seconds',
    help: 'Time to write one group-commit batch',
    buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
    registers: [this.registry],
  });
  private readonly checkpoints = new Counter({ name: 'cowstack_checkpoints_total', help: 'Checkpoints written, by what started them', labelNames: ['reason'], registers: [this.registry] });
  private readonly checkpointSeconds = new Histogram({
    name: 'cowstack_checkpoint_duration_seconds',
    help: 'Time to write a checkpoint: flush the layer files and the payload log, store the state, drop old payloads',
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  readonly replayEvents = new Gauge({ name: 'cowstack_replay_events', help: 'Events replayed while opening the store', registers: [this.registry] });
  readonly replayTotal = new Gauge({ name: 'cowstack_replay_events_total_to_replay', help: 'Events to replay while opening the store', registers: [this.registry] });
  private server: Server | undefined;

  constructor() {
    // prom-client's own names start with process_ or nodejs_: cowstack_process_cpu_seconds_total, ...
    collectDefaultMetrics({ register: this.registry, prefix: 'cowstack_' });
  }

  /** NbdServer's onRequest hook. */
  readonly onRequest = (command: string, bytes: number, latencyMs: number): void => {
    this.requests.inc({ command });
    this.bytes.inc({ command }, bytes);
    this.latency.observe({ command }, latencyMs / 1000);
  };

  attach(store: Store): void {
    store.eventLog.batches$.subscribe((b) => {
      this.appends.inc(b.records);
      this.batches.inc({ sync: String(b.sync) });
      if (b.records > 0) this.batchRecords.observe(b.records);
      this.batchSeconds.observe(b.durationMs / 1000);
    });
    store.checkpoints$.subscribe((c) => {
      this.checkpoints.inc({ reason: c.reason });
      this.checkpointSeconds.observe(c.durationMs / 1000);
    });
    const tree = (name: string, help: string, count: () => number): void => {
      new Gauge({
        name,
        help,
        registers: [this.registry],
        collect() {
          this.set(count());
        },
      });
    };
    tree('cowstack_volumes', 'Volumes in the store', () => store.projection.volumes.size);
    tree('cowstack_layers', 'Layers in the store', () => store.projection.layers.size);
    tree('cowstack_snapshots', 'Named snapshots in the store', () => store.projection.snapshots.size);
    tree('cowstack_journal_last_seq', 'Last committed journal seq', () => store.lastSeq);
  }

  async listen(host: string, port: number): Promise<{ host: string; port: number }> {
    const server = createServer((req, res) => {
      if (req.url !== '/metrics') {
        res.writeHead(404).end('try /metrics\n');
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
        (err: Error) => res.writeHead(500).end(err.message),
      );
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    const address = server.address();
    return typeof address === 'object' && address !== null ? { host: address.address, port: address.port } : { host, port };
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
