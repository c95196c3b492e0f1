/**
 * Soak test of `cowstack serve` (issue 7, "Soak"): 64 concurrent libnbd connections of mixed load
 * against one server for `durationS` seconds (30 minutes in the full run, 2 in CI).
 *
 * Layout: volumes soak0, soak1, soak2 (32 MiB each) and soakc, a clone of soak0@base; 12 writer
 * connections per volume, each owning a region of 1 MiB + 1000 bytes (region boundaries fall inside
 * blocks, so neighbours complete each other's blocks), prefilled with a known pattern before
 * soak0@base and soak1@base are taken; 8 reader connections on each of those two snapshots. Four
 * Python processes (soak-client.py, Debian's /usr/bin/python3 with libnbd) drive 16 connections each
 * with asynchronous I/O: Poisson arrivals at `ratePerConn` operations per second per connection, at
 * most `queueDepth` in flight, reconnecting now and then; writers mix reads, writes, FUA writes,
 * write-zeroes, trims, block status and flushes and check every read against a shadow copy; readers
 * check the snapshots still read as the prefill.
 *
 * Measured: the server's RSS (/proc VmRSS and `cowstack_process_resident_memory_bytes` from
 * `serve --metrics`), its request latency histograms and open connections, every `sampleS` seconds;
 * client-side latency histograms per window. Asserted: no error from any client, every read and the
 * final read-back of every region correct, 64 connections open throughout, RSS flat (end ≤ warm-up
 * RSS × rssGrowthLimit), p99 latency stable (last quarter ≤ max(p99Factor × first quarter, first
 * quarter + p99SlackMs)); then SIGTERM → exit 0, `cowstack check` clean, and after a restart every
 * region reads back with the sha256 the clients computed.
 *
 * Run directly: `node --conditions=source --import tsx test/reliability/soak.harness.ts [--full]
 * [--seconds N]`; it prints the figures and a markdown summary for RELIABILITY.md.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { request } from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { cowstack, cowstackOk, initStore, python, run, type Served, startServe, tempDir } from '../harness.js';
import { freePort, mib, rssBytes } from './fuzz.harness.js';

const here = dirname(fileURLToPath(import.meta.url));
const MiB = 1024 * 1024;

export interface SoakOptions {
  readonly durationS: number;
  /** RSS at this time is the baseline (caches, indexes and the V8 heap have grown to size). */
  readonly warmupS: number;
  readonly windowS: number;
  readonly sampleS: number;
  readonly ratePerConn: number;
  readonly queueDepth: number;
  /** Mean seconds between a connection's reconnects. */
  readonly reconnectS: number;
  /** End RSS may exceed the warm-up RSS by this factor at most. */
  readonly rssGrowthLimit: number;
  /** Last-quarter p99 may be at most max(p99Factor × first-quarter p99, first-quarter p99 + p99SlackMs). */
  readonly p99Factor: number;
  readonly p99SlackMs: number;
  /** The p99 comparison counts only if the machine's mean load in the last quarter is at most this × the first quarter's + 0.5. */
  readonly loadGrowthLimit: number;
  /** Server CPU time per request in the last quarter may be at most this × the first quarter's. */
  readonly cpuPerRequestGrowthLimit: number;
  readonly seed: number;
  readonly log: (line: string) => void;
}

export const ciSoakOptions: SoakOptions = {
  durationS: 120,
  warmupS: 30,
  windowS: 10,
  sampleS: 5,
  ratePerConn: 25,
  queueDepth: 2,
  reconnectS: 40,
  rssGrowthLimit: 1.25,
  p99Factor: 2,
  p99SlackMs: 5,
  loadGrowthLimit: 1.5,
  cpuPerRequestGrowthLimit: 1.5,
  seed: 5,
  log: () => {},
};
export const fullSoakOptions: SoakOptions = { ...ciSoakOptions, durationS: 1800, warmupS: 180, windowS: 30, sampleS: 10, reconnectS: 120 };

const processes = 4;
const writersPerVolume = 12;
const readersPerSnapshot = 8;
const regionBytes = MiB + 1000;
const volumeSize = '32M';

interface Region {
  readonly name: string;
  readonly exportName: string;
  readonly role: 'writer' | 'reader';
  readonly offset: number;
  readonly length: number;
  readonly patternSeed: number;
}

/** The 64 regions: writers on soak0..2 and soakc, readers on soak0@base and soak1@base. */
function layout(): Region[] {
  const out: Region[] = [];
  const seed = (volume: number, i: number): number => 1000 * volume + i + 1;
  // Writers own [i * regionBytes, (i+1) * regionBytes) but only the first 1 MiB of it: the rest stays
  // the prefill, and the boundary at 1 MiB + i * 1000 falls inside a block.
  for (const [v, name] of ['soak0', 'soak1', 'soak2', 'soakc'].entries()) {
    for (let i = 0; i < writersPerVolume; i++) {
      out.push({ name: `${name}/w${i}`, exportName: name, role: 'writer', offset: i * regionBytes, length: MiB, patternSeed: seed(name === 'soakc' ? 0 : v, i) });
    }
  }
  for (const [v, name] of ['soak0@base', 'soak1@base'].entries()) {
    for (let i = 0; i < readersPerSnapshot; i++) out.push({ name: `${name}/r${i}`, exportName: name, role: 'reader', offset: i * regionBytes, length: MiB, patternSeed: seed(v, i) });
  }
  return out;
}

export interface Sample {
  readonly t: number;
  readonly rssBytes: number;
  readonly rssMetricBytes: number;
  readonly heapUsedBytes: number;
  readonly connections: number;
  readonly requests: number;
  /** Cumulative server latency buckets: upper bound (s) → count, all commands. */
  readonly buckets: ReadonlyMap<number, number>;
  readonly storeBytes: number;
  /** Event-loop delay since the previous scrape (prom-client resets it at each scrape). */
  readonly lagMaxMs: number;
  readonly lagP99Ms: number;
  readonly cpuSeconds: number;
  /** The machine's 1-minute load average. */
  readonly load1: number;
}

export interface WindowStats {
  readonly t: number;
  readonly ops: number;
  readonly errors: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
  readonly maxMs: number;
  readonly serverP99Ms: number | undefined;
}

export interface SoakReport {
  readonly options: Omit<SoakOptions, 'log'>;
  readonly command: string;
  readonly seconds: number;
  readonly connections: number;
  readonly ops: number;
  readonly opsByKind: Record<string, number>;
  readonly reconnects: number;
  readonly verifiedBytes: number;
  readonly errors: unknown[];
  readonly mismatches: unknown[];
  readonly clientFailures: string[];
  readonly samples: Sample[];
  readonly windows: WindowStats[];
  readonly rss: { readonly startBytes: number; readonly warmBytes: number; readonly middleBytes: number; readonly endBytes: number; readonly maxBytes: number };
  readonly p99: {
    readonly firstQuarterMs: number;
    readonly lastQuarterMs: number;
    readonly serverFirstQuarterMs: number;
    readonly serverLastQuarterMs: number;
    readonly firstQuarterByKindMs: Record<string, number>;
    readonly lastQuarterByKindMs: Record<string, number>;
  };
  readonly minConnections: number;
  readonly serverExit: string;
  readonly checkExit: number | null;
  readonly checkOutput: string;
  readonly restartVerify: string;
  readonly storeBytesEnd: number;
  /** Server CPU time per request (µs) in the first and the last quarter. */
  readonly cpuPerRequestUs: readonly [number, number];
  /** Mean machine load average in the first and the last quarter. */
  readonly quarterLoad: readonly [number, number];
  /** Server CPU use during the load (100 = one core). */
  readonly serverCpuPercent: number;
  readonly maxEventLoopLagMs: number;
  /** The machine's 1-minute load average at the start and end of the load (the machine is shared). */
  readonly loadAverage: readonly [number, number];
}

// ---------------------------------------------------------------------------------------------
// metrics

function fetchText(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request(url, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
    req.setTimeout(10_000, () => req.destroy(new Error('metrics request timed out')));
    req.end();
  });
}

interface Metrics {
  readonly values: Map<string, number>;
  readonly buckets: Map<number, number>;
  readonly requests: number;
}

/** The few series the soak reads from Prometheus text. */
export function parseMetrics(text: string): Metrics {
  const values = new Map<string, number>();
  const buckets = new Map<number, number>();
  let requests = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m === null) continue;
    const [, name, labels, value] = m;
    const v = Number(value);
    if (name === 'cowstack_nbd_request_duration_seconds_bucket') {
      const le = /le="([^"]+)"/.exec(labels ?? '')?.[1];
      if (le !== undefined) {
        const bound = le === '+Inf' ? Infinity : Number(le);
        buckets.set(bound, (buckets.get(bound) ?? 0) + v);
      }
    } else if (name === 'cowstack_nbd_requests_total') requests += v;
    else if (labels === undefined) values.set(name, v);
  }
  return { values, buckets, requests };
}

/** p99 (ms, a bucket's upper bound) of the requests between two cumulative bucket snapshots. */
function serverP99Ms(before: ReadonlyMap<number, number>, after: ReadonlyMap<number, number>): number | undefined {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const total = (after.get(Infinity) ?? 0) - (before.get(Infinity) ?? 0);
  if (total <= 0) return undefined;
  for (const b of bounds) {
    if ((after.get(b) ?? 0) - (before.get(b) ?? 0) >= 0.99 * total) return b === Infinity ? Infinity : b * 1000;
  }
  return undefined;
}

/** Client histograms: bucket i covers [0.05 ms × 10^(i/20), 0.05 ms × 10^((i+1)/20)). */
function histogramPercentile(histogram: ReadonlyMap<number, number>, p: number): number {
  const total = [...histogram.values()].reduce((a, b) => a + b, 0);
  if (total === 0) return 0;
  let seen = 0;
  for (const i of [...histogram.keys()].sort((a, b) => a - b)) {
    seen += histogram.get(i)!;
    if (seen >= p * total) return 0.05 * 10 ** ((i + 1) / 20);
  }
  return Infinity;
}

function mergeHistograms(into: Map<number, number>, from: Record<string, number>): void {
  for (const [k, n] of Object.entries(from)) into.set(Number(k), (into.get(Number(k)) ?? 0) + n);
}

async function duBytes(dir: string): Promise<number> {
  const r = await run('du', ['-sb', dir], { timeoutMs: 60_000 });
  return Number(r.stdout.split('\t')[0]) || 0;
}

// ---------------------------------------------------------------------------------------------
// the run

const prefillScript = String.raw`
import json, random, sys, nbd
regions = json.load(open(sys.argv[1]))
handles = {}
for r in regions:
    h = handles.get(r['uri'])
    if h is None:
        h = handles[r['uri']] = nbd.NBD()
        h.connect_uri(r['uri'])
    h.pwrite(random.Random(r['pattern_seed']).randbytes(r['length']), r['offset'])
for h in handles.values():
    h.flush()
    h.shutdown()
`;

const verifyScript = String.raw`
import hashlib, json, sys, nbd
regions = json.load(open(sys.argv[1]))
handles = {}
bad = []
for name, r in regions.items():
    h = handles.get(r['uri'])
    if h is None:
        h = handles[r['uri']] = nbd.NBD()
        h.connect_uri(r['uri'])
    if hashlib.sha256(h.pread(r['length'], r['offset'])).hexdigest() != r['sha256']:
        bad.append(name)
for h in handles.values():
    h.shutdown()
print(json.dumps({'checked': len(regions), 'bad': bad}))
`;

export async function runSoak(options: SoakOptions): Promise<SoakReport> {
  const log = options.log;
  const t0 = performance.now();
  const store = await initStore({ size: volumeSize, label: 'soak' });
  for (const v of ['soak0', 'soak1', 'soak2']) await cowstackOk(['volume', 'create', store, v, '--size', volumeSize]);
  const metricsPort = await freePort();
  const served: Served = await startServe(store, { args: ['--metrics', `127.0.0.1:${metricsPort}`] });
  const command = `cowstack serve STORE --socket SOCK --metrics 127.0.0.1:${metricsPort}`;
  const pid = served.child.pid!;
  const work = tempDir('soak');
  const regions = layout();

  // prefill every writer region of soak0..2 (the readers' regions are among them), then snapshot and clone
  const prefill = regions
    .filter((r) => r.role === 'writer' && r.exportName !== 'soakc')
    .map((r) => ({ uri: served.uri(r.exportName), offset: r.offset, length: regionBytes, pattern_seed: r.patternSeed }));
  writeFileSync(join(work, 'prefill.json'), JSON.stringify(prefill));
  const pre = await python(prefillScript, [join(work, 'prefill.json')], { timeoutMs: 300_000 });
  if (pre.code !== 0) throw new Error(`prefill failed: ${pre.stderr}`);
  await cowstackOk(['snapshot', store, 'soak0', '--name', 'base']);
  await cowstackOk(['snapshot', store, 'soak1', '--name', 'base']);
  await cowstackOk(['clone', store, 'soak0@base', 'soakc']);
  const startRss = rssBytes(pid);
  log(`soak: store ready in ${((performance.now() - t0) / 1000).toFixed(1)} s; server pid ${pid} RSS ${mib(startRss)}; ${regions.length} connections for ${options.durationS} s`);

  const loadAtStart = loadavg()[0];
  // ---- the clients
  const clients = Array.from({ length: processes }, (_, p) => {
    const mine = regions.filter((_, i) => i % processes === p);
    const config = {
      seed: options.seed * 100 + p,
      duration_s: options.durationS,
      window_s: options.windowS,
      rate_per_conn: options.ratePerConn,
      queue_depth: options.queueDepth,
      reconnect_s: options.reconnectS,
      block_size: 4096,
      connections: mine.map((r) => ({ name: r.name, uri: served.uri(r.exportName), role: r.role, offset: r.offset, length: r.length, pattern_seed: r.patternSeed })),
    };
    const file = join(work, `client-${p}.json`);
    writeFileSync(file, JSON.stringify(config));
    return run('/usr/bin/python3', [join(here, 'soak-client.py'), file], { timeoutMs: (options.durationS + 600) * 1000 });
  });

  // ---- sampling
  const loadStart = performance.now();
  const samples: Sample[] = [];
  let sampling = true;
  const sampler = (async () => {
    let n = 0;
    while (sampling) {
      const t = (performance.now() - loadStart) / 1000;
      try {
        const m = parseMetrics(await fetchText(`http://127.0.0.1:${metricsPort}/metrics`));
        const storeBytes = n % 6 === 0 ? await duBytes(store) : (samples[samples.length - 1]?.storeBytes ?? 0);
        samples.push({
          t,
          rssBytes: rssBytes(pid),
          rssMetricBytes: m.values.get('cowstack_process_resident_memory_bytes') ?? 0,
          heapUsedBytes: m.values.get('cowstack_nodejs_heap_size_used_bytes') ?? 0,
          connections: m.values.get('cowstack_nbd_connections') ?? 0,
          requests: m.requests,
          buckets: m.buckets,
          storeBytes,
          lagMaxMs: (m.values.get('cowstack_nodejs_eventloop_lag_max_seconds') ?? 0) * 1000,
          lagP99Ms: (m.values.get('cowstack_nodejs_eventloop_lag_p99_seconds') ?? 0) * 1000,
          cpuSeconds: m.values.get('cowstack_process_cpu_seconds_total') ?? 0,
          load1: loadavg()[0],
        });
        const s = samples[samples.length - 1];
        if (n % Math.max(1, Math.round(30 / options.sampleS)) === 0) {
          log(`soak: ${t.toFixed(0)} s: RSS ${mib(s.rssBytes)} (heap ${mib(s.heapUsedBytes)}), ${s.connections} connections, ${s.requests} requests, event-loop lag max ${s.lagMaxMs.toFixed(0)} ms, store ${mib(s.storeBytes)}, load ${loadavg()[0].toFixed(1)}`);
        }
      } catch (e) {
        log(`soak: metrics sample failed: ${(e as Error).message}`);
      }
      n++;
      const next = loadStart + (n * options.sampleS + 1) * 1000;
      while (sampling && performance.now() < next) await new Promise((resolve) => setTimeout(resolve, 200));
      if (t > options.durationS) break;
    }
  })();
  const results = await Promise.all(clients);
  const loadAtEnd = loadavg()[0];
  sampling = false;
  await sampler;

  // ---- client results
  const clientFailures: string[] = [];
  const windowsByIndex = new Map<number, { t: number; ops: number; errors: number; histogram: Map<number, number>; kinds: Map<string, Map<number, number>>; max: number }>();
  let ops = 0;
  let reconnects = 0;
  let verifiedBytes = 0;
  const opsByKind: Record<string, number> = {};
  const errors: unknown[] = [];
  const mismatches: unknown[] = [];
  const finalRegions: Record<string, { uri: string; offset: number; length: number; sha256: string; writer: boolean }> = {};
  results.forEach((r, p) => {
    if (r.code !== 0) clientFailures.push(`client ${p} exited ${r.code}: ${r.stderr.slice(-2000)}`);
    let sawFinal = false;
    for (const line of r.stdout.split('\n')) {
      if (line.trim() === '') continue;
      const j = JSON.parse(line) as {
        window?: { t_start: number; t_end: number; ops: number; errors: number; max: number; histogram: Record<string, number>; kinds: Record<string, Record<string, number>> };
        final?: { ops: number; errors: unknown[]; mismatches: unknown[]; by_kind: Record<string, number>; connects: number; verified_bytes: number };
        regions?: typeof finalRegions;
      };
      if (j.window !== undefined) {
        const index = Math.max(1, Math.round(j.window.t_end / options.windowS));
        const w = windowsByIndex.get(index) ?? { t: index * options.windowS, ops: 0, errors: 0, histogram: new Map(), kinds: new Map(), max: 0 };
        for (const [kind, h] of Object.entries(j.window.kinds)) {
          if (!w.kinds.has(kind)) w.kinds.set(kind, new Map());
          mergeHistograms(w.kinds.get(kind)!, h);
        }
        w.ops += j.window.ops;
        w.errors += j.window.errors;
        w.max = Math.max(w.max, j.window.max ?? 0);
        mergeHistograms(w.histogram, j.window.histogram);
        windowsByIndex.set(index, w);
      }
      if (j.final !== undefined) {
        sawFinal = true;
        ops += j.final.ops;
        reconnects += j.final.connects;
        verifiedBytes += j.final.verified_bytes;
        errors.push(...j.final.errors);
        mismatches.push(...j.final.mismatches);
        for (const [k, n] of Object.entries(j.final.by_kind)) opsByKind[k] = (opsByKind[k] ?? 0) + n;
        Object.assign(finalRegions, j.regions);
      }
    }
    if (!sawFinal) clientFailures.push(`client ${p} printed no final report: ${r.stderr.slice(-2000)}`);
  });
  reconnects -= regions.length; // first connections are not reconnects

  // ---- windows: client percentiles, server p99 from histogram deltas
  const sampleAt = (t: number): Sample | undefined => samples.reduce<Sample | undefined>((best, s) => (best === undefined || Math.abs(s.t - t) < Math.abs(best.t - t) ? s : best), undefined);
  const windows: WindowStats[] = [...windowsByIndex.entries()]
    .sort((a, b) => a[0] - b[0])
    .map(([, w]) => {
      const before = sampleAt(w.t - options.windowS);
      const after = sampleAt(w.t);
      return {
        t: w.t,
        ops: w.ops,
        errors: w.errors,
        p50Ms: histogramPercentile(w.histogram, 0.5),
        p99Ms: histogramPercentile(w.histogram, 0.99),
        maxMs: w.max,
        serverP99Ms: before !== undefined && after !== undefined && after !== before ? serverP99Ms(before.buckets, after.buckets) : undefined,
      };
    });
  const quarter = (from: number, to: number): { client: number; server: number; kinds: Record<string, number>; cpuPerRequestUs: number; load: number } => {
    const h = new Map<number, number>();
    const kinds = new Map<string, Map<number, number>>();
    for (const [, w] of windowsByIndex) {
      if (!(w.t > from && w.t <= to + 0.5)) continue;
      for (const [k, n] of w.histogram) h.set(k, (h.get(k) ?? 0) + n);
      for (const [kind, kh] of w.kinds) {
        if (!kinds.has(kind)) kinds.set(kind, new Map());
        for (const [k, n] of kh) kinds.get(kind)!.set(k, (kinds.get(kind)!.get(k) ?? 0) + n);
      }
    }
    const a = sampleAt(from);
    const b = sampleAt(to);
    const during = samples.filter((x) => x.t > from && x.t <= to + 0.5);
    return {
      client: histogramPercentile(h, 0.99),
      server: a !== undefined && b !== undefined ? (serverP99Ms(a.buckets, b.buckets) ?? NaN) : NaN,
      kinds: Object.fromEntries([...kinds].map(([kind, kh]) => [kind, histogramPercentile(kh, 0.99)])),
      cpuPerRequestUs: a !== undefined && b !== undefined && b.requests > a.requests ? (1e6 * (b.cpuSeconds - a.cpuSeconds)) / (b.requests - a.requests) : NaN,
      load: during.length > 0 ? during.reduce((n, x) => n + x.load1, 0) / during.length : NaN,
    };
  };
  const D = options.durationS;
  const first = quarter(0, D / 4);
  const last = quarter((3 * D) / 4, D);

  const loaded = samples.filter((s) => s.t <= D);
  const warm = sampleAt(options.warmupS);
  const middle = sampleAt(D / 2);
  const end = loaded[loaded.length - 1];
  const minConnections = Math.min(...loaded.filter((s) => s.t >= 10 && s.t <= D - 10).map((s) => s.connections));

  // ---- stop, check, restart and verify every region
  let serverExit = '0';
  try {
    await served.stop();
  } catch (e) {
    serverExit = (e as Error).message.split('\n')[0];
  }
  const check = await cowstack(['check', store], { timeoutMs: 1_800_000 });
  let restartVerify = 'not run';
  if (Object.keys(finalRegions).length > 0) {
    const again = await startServe(store);
    const file = join(work, 'regions.json');
    const withUris = Object.fromEntries(Object.entries(finalRegions).map(([name, r]) => [name, { ...r, uri: again.uri(name.slice(0, name.lastIndexOf('/'))) }]));
    writeFileSync(file, JSON.stringify(withUris));
    const v = await python(verifyScript, [file], { timeoutMs: 300_000 });
    restartVerify = v.code === 0 ? v.stdout.trim() : `exit ${v.code}: ${v.stderr.slice(-1000)}`;
    await again.stop();
  }
  const storeBytesEnd = await duBytes(store);
  return {
    options: { ...options, log: undefined } as unknown as Omit<SoakOptions, 'log'>,
    command,
    seconds: (performance.now() - t0) / 1000,
    connections: regions.length,
    ops,
    opsByKind,
    reconnects,
    verifiedBytes,
    errors,
    mismatches,
    clientFailures,
    samples,
    windows,
    rss: { startBytes: startRss, warmBytes: warm?.rssBytes ?? 0, middleBytes: middle?.rssBytes ?? 0, endBytes: end?.rssBytes ?? 0, maxBytes: Math.max(...loaded.map((s) => s.rssBytes)) },
    p99: { firstQuarterMs: first.client, lastQuarterMs: last.client, serverFirstQuarterMs: first.server, serverLastQuarterMs: last.server, firstQuarterByKindMs: first.kinds, lastQuarterByKindMs: last.kinds },
    cpuPerRequestUs: [first.cpuPerRequestUs, last.cpuPerRequestUs],
    quarterLoad: [first.load, last.load],
    minConnections,
    serverExit,
    checkExit: check.code,
    checkOutput: (check.stdout + check.stderr).slice(0, 2000),
    restartVerify,
    storeBytesEnd,
    serverCpuPercent: loaded.length > 1 ? (100 * (loaded[loaded.length - 1].cpuSeconds - loaded[0].cpuSeconds)) / (loaded[loaded.length - 1].t - loaded[0].t) : 0,
    maxEventLoopLagMs: Math.max(0, ...loaded.map((s) => s.lagMaxMs)),
    loadAverage: [loadAtStart, loadAtEnd],
  };
}

/** Whether the quarters ran on a comparably loaded machine (mean load average within the limit). */
export function p99Comparable(r: SoakReport, options: SoakOptions): boolean {
  const [a, b] = r.quarterLoad;
  return !(b > a * options.loadGrowthLimit + 0.5);
}

export function soakProblems(r: SoakReport, options: SoakOptions): string[] {
  const out: string[] = [];
  out.push(...r.clientFailures);
  if (r.errors.length > 0) out.push(`${r.errors.length} client errors: ${JSON.stringify(r.errors.slice(0, 5))}`);
  if (r.mismatches.length > 0) out.push(`${r.mismatches.length} data mismatches: ${JSON.stringify(r.mismatches.slice(0, 5))}`);
  if (r.minConnections < r.connections - 4) out.push(`only ${r.minConnections} connections open at one sample (expected about ${r.connections})`);
  const limit = r.rss.warmBytes * options.rssGrowthLimit;
  if (!(r.rss.endBytes <= limit)) out.push(`RSS grew from ${mib(r.rss.warmBytes)} after warm-up to ${mib(r.rss.endBytes)} at the end (limit ${mib(limit)})`);
  const p99Limit = Math.max(options.p99Factor * r.p99.firstQuarterMs, r.p99.firstQuarterMs + options.p99SlackMs);
  if (!(r.p99.lastQuarterMs <= p99Limit)) {
    // The machine is shared: when its load rose between the quarters, latency says more about the
    // neighbours than about the server; the server's own CPU per request is then the judge.
    if (p99Comparable(r, options)) out.push(`p99 latency rose from ${r.p99.firstQuarterMs.toFixed(2)} ms (first quarter) to ${r.p99.lastQuarterMs.toFixed(2)} ms (last quarter; limit ${p99Limit.toFixed(2)} ms)`);
  }
  const [cpuFirst, cpuLast] = r.cpuPerRequestUs;
  if (!(cpuLast <= cpuFirst * options.cpuPerRequestGrowthLimit)) out.push(`server CPU per request rose from ${cpuFirst.toFixed(1)} µs (first quarter) to ${cpuLast.toFixed(1)} µs (last quarter; limit ×${options.cpuPerRequestGrowthLimit})`);
  if (r.serverExit !== '0') out.push(`server exit after SIGTERM: ${r.serverExit}`);
  if (r.checkExit !== 0) out.push(`cowstack check exited ${r.checkExit}: ${r.checkOutput}`);
  if (!/"bad": \[\]/.test(r.restartVerify)) out.push(`after a restart: ${r.restartVerify}`);
  const expectedOps = r.connections * options.ratePerConn * options.durationS * 0.5;
  if (r.ops < expectedOps) out.push(`only ${r.ops} operations (expected at least ${expectedOps.toFixed(0)}: the load did not run)`);
  return out;
}

export function formatSoakReport(r: SoakReport): string {
  const kinds = Object.entries(r.opsByKind)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n}`)
    .join(', ');
  const lines = [
    `soak: ${r.connections} connections for ${r.options.durationS} s (${r.seconds.toFixed(0)} s in all); ${r.ops} operations (${(r.ops / r.options.durationS).toFixed(0)}/s: ${kinds}); ${r.reconnects} reconnects; ${mib(r.verifiedBytes)} verified`,
    `  errors ${r.errors.length}, mismatches ${r.mismatches.length}, client failures ${r.clientFailures.length}; fewest connections open at a sample ${r.minConnections}`,
    `  server RSS: ${mib(r.rss.startBytes)} before the load, ${mib(r.rss.warmBytes)} after warm-up (${r.options.warmupS} s), ${mib(r.rss.middleBytes)} in the middle, ${mib(r.rss.endBytes)} at the end, max ${mib(r.rss.maxBytes)}`,
    `  p99 latency (client, submission to completion): first quarter ${r.p99.firstQuarterMs.toFixed(2)} ms, last quarter ${r.p99.lastQuarterMs.toFixed(2)} ms; server histogram p99: ${r.p99.serverFirstQuarterMs} ms → ${r.p99.serverLastQuarterMs} ms`,
    `  p99 by kind, first → last quarter (ms): ${Object.keys(r.p99.firstQuarterByKindMs)
      .sort()
      .map((k) => `${k} ${r.p99.firstQuarterByKindMs[k].toFixed(1)} → ${(r.p99.lastQuarterByKindMs[k] ?? NaN).toFixed(1)}`)
      .join(', ')}`,
    `  server CPU per request: first quarter ${r.cpuPerRequestUs[0].toFixed(1)} µs, last quarter ${r.cpuPerRequestUs[1].toFixed(1)} µs; machine load average (mean) first quarter ${r.quarterLoad[0].toFixed(1)}, last quarter ${r.quarterLoad[1].toFixed(1)}${p99Comparable(r, r.options as SoakOptions) ? '' : ' (load rose: the p99 comparison is not judged)'}`,
    `  server CPU ${r.serverCpuPercent.toFixed(0)}% of a core; longest event-loop stall ${r.maxEventLoopLagMs.toFixed(0)} ms; machine load average ${r.loadAverage[0].toFixed(1)} → ${r.loadAverage[1].toFixed(1)} (2 cores, shared)`,
    `  store on disk at the end ${mib(r.storeBytesEnd)}; server exit after SIGTERM ${r.serverExit}; cowstack check exit ${r.checkExit}; after restart ${r.restartVerify}`,
    `  windows (t s: ops, client p50/p99/max ms, server p99 ms):`,
    ...r.windows.map((w) => `    ${w.t.toFixed(0).padStart(5)}: ${String(w.ops).padStart(6)} ops, ${w.p50Ms.toFixed(2)}/${w.p99Ms.toFixed(2)}/${w.maxMs.toFixed(1)}, ${w.serverP99Ms ?? '-'}${w.errors > 0 ? `, ${w.errors} ERRORS` : ''}`),
    `  RSS samples (t s: MiB): ${r.samples
      .filter((_, i) => i % Math.max(1, Math.floor(r.samples.length / 24)) === 0)
      .map((s) => `${s.t.toFixed(0)}:${(s.rssBytes / MiB).toFixed(0)}`)
      .join(' ')}`,
  ];
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// direct run

async function main(argv: readonly string[]): Promise<number> {
  const arg = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const base = argv.includes('--full') ? fullSoakOptions : ciSoakOptions;
  const seconds = arg('--seconds');
  const options: SoakOptions = {
    ...base,
    ...(seconds !== undefined ? { durationS: Number(seconds), warmupS: Math.min(base.warmupS, Number(seconds) / 4) } : {}),
    log: (line) => console.log(line),
  };
  const report = await runSoak(options);
  console.log(formatSoakReport(report));
  const out = arg('--json');
  if (out !== undefined) {
    mkdirSync(dirname(out), { recursive: true });
    writeFileSync(out, JSON.stringify({ ...report, samples: report.samples.map((s) => ({ ...s, buckets: Object.fromEntries(s.buckets) })) }, null, 1));
  }
  const problems = soakProblems(report, options);
  for (const p of problems) console.log(`FAIL: ${p}`);
  console.log(problems.length === 0 ? 'soak: PASS' : `soak: FAIL (${problems.length} problems)`);
  return problems.length === 0 ? 0 : 1;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e: unknown) => {
      console.error(e);
      process.exit(1);
    },
  );
}
