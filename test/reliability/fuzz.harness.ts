/**
 * Protocol fuzzing of `cowstack serve` (issue 7, "Protocol fuzzing").
 *
 * One server, on a unix socket and a TCP port, exports fuzz volumes (`fuzz` 1 MiB, `fuzzbig` 40 MiB,
 * `default` 1 MiB), a snapshot `fuzz@ro`, and two victim volumes the fuzzer never names. Then, at
 * the same time:
 * - `parallel` fuzz workers each open connection after connection, send one generated and mutated
 *   session per connection (fuzz-frames.ts), half-close, collect the answers, and judge them
 *   (fuzz-oracle.ts): answered per the spec or closed cleanly, no hang (5 s of silence after the
 *   client's FIN), no reset;
 * - a libnbd client (fuzz-victim.py, Debian's /usr/bin/python3) writes, zeroes, reads back and
 *   verifies data on `victim`, reconnecting every 100 operations;
 * - qemu-io writes and reads back patterns (-P, verified by qemu-io) on `victimq`, one run a second.
 * The run stops when `frames` mutated frames have been sent. Then the victims' results are checked,
 * the server's RSS must be at most `maxServerRssBytes`, the server gets SIGTERM and must exit 0,
 * `cowstack check` must pass, and its stderr (-v) must hold no "internal error" or "failed
 * unexpectedly" line.
 *
 * Run directly: `node --conditions=source --import tsx test/reliability/fuzz.harness.ts [--full]
 * [--frames N] [--parallel N] [--seed N]`; `--replay SEED:INDEX` regenerates one session and runs it
 * alone against a fresh server, printing the verdict. Failing sessions are written to a directory
 * (printed) as .bin (bytes sent) and .json (verdict, bytes received).
 */
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createConnection, createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { limits } from '@cowstack/nbd';
import { cowstack, cowstackOk, initStore, pattern, run, type Served, sleep, startServe, tempDir, writeExport } from '../harness.js';
import { runSession, type SessionResult } from './fuzz-client.js';
import { countFrames, type FuzzExport, type FuzzSession, type FuzzTargets, generateSessions } from './fuzz-frames.js';
import { judge, type OracleContext, type OracleExport, type Verdict } from './fuzz-oracle.js';

const here = dirname(fileURLToPath(import.meta.url));
const MiB = 1024 * 1024;

export interface FuzzOptions {
  /** Stop once this many mutated frames have been sent. */
  readonly frames: number;
  /** Fuzz connections at once. */
  readonly parallel: number;
  readonly seed: number;
  /** Silence after the client's FIN that counts as a hang. */
  readonly idleTimeoutMs: number;
  /** Relative weight of point-in-time export names among generated names (0 = none). */
  readonly pointInTimeWeight: number;
  /** Stop early (and fail) after this many failing sessions. */
  readonly maxFailures: number;
  /**
   * The server's RSS at the end may be at most this. Its heap, LevelDB's cache and the read buffers
   * kept for reuse settle near 200-240 MiB; a reader thread that held every large read buffer of a
   * new length reached 493-519 MiB within a CI-length run (see RELIABILITY.md).
   */
  readonly maxServerRssBytes: number;
  readonly log: (line: string) => void;
}

export const ciOptions: FuzzOptions = { frames: 100_000, parallel: 6, seed: 7, idleTimeoutMs: 5000, pointInTimeWeight: 1, maxFailures: 25, maxServerRssBytes: 320 * 1024 * 1024, log: () => {} };
export const fullOptions: FuzzOptions = { ...ciOptions, frames: 1_000_000, parallel: 8, seed: 1 };

export interface VictimReport {
  readonly ops: number;
  readonly writes: number;
  readonly fua_writes: number;
  readonly zeroes: number;
  readonly reads: number;
  readonly flushes: number;
  readonly verified_bytes: number;
  readonly connections: number;
  readonly errors: unknown[];
  readonly mismatches: unknown[];
  readonly latency_ms: { p50: number; p99: number; max: number };
  readonly max_gap_ms: number;
}

export interface FuzzReport {
  readonly seed: number;
  readonly seconds: number;
  readonly connections: number;
  readonly framesSent: number;
  readonly mutatedFramesSent: number;
  /** Options and requests the server had to parse (per the oracle's framing). */
  readonly framesParsed: number;
  readonly requestsParsed: number;
  readonly bytesSent: number;
  readonly bytesReceived: number;
  readonly outcomes: Record<string, number>;
  readonly errnos: Record<string, number>;
  /** Answers that showed a known cowstack bug (fuzz-oracle.ts knownBugs), by bug. */
  readonly knownBugs: Record<string, number>;
  /** Failing sessions (violations, hangs, resets, connect failures). */
  readonly failures: number;
  readonly failureKinds: Record<string, number>;
  readonly failureSamples: string[];
  readonly failureDir: string;
  readonly slowestSessionMs: number;
  readonly serverRssBeforeBytes: number;
  readonly serverRssAfterBytes: number;
  readonly serverAlive: boolean;
  readonly serverExit: string;
  readonly serverLogProblems: string[];
  readonly checkExit: number | null;
  readonly checkOutput: string;
  readonly victim: VictimReport | undefined;
  readonly victimRaw: string;
  readonly qemuIo: { runs: number; failures: string[]; maxMs: number };
  /** Clients that stop in the middle of the handshake without closing: closed by the handshake timeout. */
  readonly silent: { sessions: number; maxClosedAfterMs: number; failures: string[] };
}

// ---------------------------------------------------------------------------------------------
// helpers

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** VmRSS of a process, in bytes. */
export function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const match = /VmRSS:\s+(\d+) kB/.exec(status);
  return match ? Number(match[1]) * 1024 : 0;
}

export function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

/** A violation message with its numbers taken out, to count kinds of failure. */
function kindOf(message: string): string {
  return message
    .replace(/'[^']*'/g, "'…'")
    .replace(/#\d+/g, '#N')
    .replace(/0x[0-9a-f]+/gi, 'X')
    .replace(/\d+/g, 'N')
    .slice(0, 140);
}

interface Fixture {
  readonly store: string;
  readonly served: Served;
  readonly tcp: { host: string; port: number };
  readonly targets: FuzzTargets;
  readonly oracle: OracleContext;
}

/** A store with the fuzz and victim exports, served on a unix socket and TCP with -v. */
export async function startFuzzServer(pointInTimeWeight: number): Promise<Fixture> {
  const store = await initStore({ size: '1M', label: 'fuzz' });
  await cowstackOk(['volume', 'create', store, 'fuzz', '--size', '1M']);
  await cowstackOk(['volume', 'create', store, 'fuzzbig', '--size', '40M']);
  await cowstackOk(['volume', 'create', store, 'victim', '--size', '16M']);
  await cowstackOk(['volume', 'create', store, 'victimq', '--size', '16M']);
  const port = await freePort();
  const served = await startServe(store, { args: ['--port', String(port), '-v'] });
  // some data and holes in the snapshot the fuzzer reads
  const snapshot = Buffer.alloc(MiB);
  pattern(256 * 1024, 3).copy(snapshot, 0);
  pattern(100 * 1024 + 17, 4).copy(snapshot, 600 * 1024);
  await writeExport(served.uri('fuzz'), 0, snapshot.subarray(0, 256 * 1024));
  await writeExport(served.uri('fuzz'), 600 * 1024, snapshot.subarray(600 * 1024, 700 * 1024 + 17));
  await cowstackOk(['snapshot', store, 'fuzz', '--name', 'ro']);
  const exports: FuzzExport[] = [
    { name: 'fuzz', sizeBytes: MiB, readOnly: false },
    { name: 'fuzzbig', sizeBytes: 40 * MiB, readOnly: false },
    { name: 'default', sizeBytes: MiB, readOnly: false },
    { name: 'fuzz@ro', sizeBytes: MiB, readOnly: true },
  ];
  const known = new Map<string, OracleExport>(exports.map((e) => [e.name, e]));
  known.set('', known.get('default')!);
  // The victims exist: names the fuzzer never generates, but LIST shows them.
  known.set('victim', { sizeBytes: 16 * MiB, readOnly: false });
  known.set('victimq', { sizeBytes: 16 * MiB, readOnly: false });
  const volumes = new Set(['default', 'fuzz', 'fuzzbig', 'victim', 'victimq']);
  const oracle: OracleContext = {
    resolve(name) {
      const hit = known.get(name);
      if (hit !== undefined) return hit;
      const pit = /^(.+)@((?:seq|time):.+)$/.exec(name);
      if (pit !== null && volumes.has(pit[1])) return 'unsure';
      return undefined;
    },
    maxPayloadBytes: limits.defaultMaxPayloadBytes,
    maxOptionBytes: limits.defaultMaxOptionBytes,
    maxDiscardedOptionBytes: limits.maxDiscardedOptionBytes,
    maxOptionsPerHandshake: limits.defaultMaxOptionsPerHandshake,
    extraOptionsPerListedExport: limits.extraOptionsPerListedExport,
    maxDiscardedPayloadBytes: limits.maxDiscardedPayloadBytes(limits.defaultMaxPayloadBytes),
    // volumes have a dirty bitmap for every snapshot of theirs (only fuzz@ro here), every seq up to
    // the last one and every valid time
    dirtyBitmapExists: (name, point) => {
      if (!['', 'default', 'fuzz', 'fuzzbig'].includes(name)) return 'unsure';
      const seq = /^seq:(\d+)$/.exec(point);
      if (seq !== null) return Number(seq[1]) <= 1 ? true : 'unsure';
      if (point.startsWith('time:')) return !Number.isNaN(Date.parse(point.slice(5)));
      return name === 'fuzz' && point === 'ro';
    },
    // the snapshot never changes: every READ of it, however framed, must return these bytes
    contentOf: (name) => (name === 'fuzz@ro' ? snapshot : undefined),
  };
  return { store, served, tcp: { host: '127.0.0.1', port }, targets: { exports, volumesForPointInTime: ['fuzz', 'default'], pointInTimeWeight }, oracle };
}

/** The server's own account of trouble: lines no client input should ever cause. */
export function serverLogProblems(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((line) => /internal error|failed unexpectedly|uncaught|unhandled|TypeError|RangeError|assertion/i.test(line))
    .slice(0, 20);
}

// ---------------------------------------------------------------------------------------------
// silent clients

const silentWaitMs = limits.defaultHandshakeTimeoutMs + 5000;

/**
 * Sends the start of a handshake that stops inside a frame (part of the client flags, of an option
 * header, or of an option's data) and then nothing, without closing: the server must close the
 * connection when its handshake timeout expires.
 */
function silentSession(socketPath: string, n: number): Promise<{ sent: number; closedAfterMs: number | undefined }> {
  const option = Buffer.alloc(16 + 40);
  option.writeBigUInt64BE(0x49484156454f5054n, 0);
  option.writeUInt32BE(6, 8); // NBD_OPT_INFO
  option.writeUInt32BE(40, 12);
  const prefixes = [Buffer.alloc(0), Buffer.from([0, 0]), Buffer.from([0, 0, 0, 3]), Buffer.concat([Buffer.from([0, 0, 0, 3]), option.subarray(0, 9)]), Buffer.concat([Buffer.from([0, 0, 0, 3]), option.subarray(0, 30)])];
  const bytes = prefixes[n % prefixes.length];
  const started = performance.now();
  return new Promise((resolve) => {
    const socket = createConnection({ path: socketPath });
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ sent: bytes.length, closedAfterMs: undefined });
    }, silentWaitMs);
    socket.on('error', () => {});
    socket.on('data', () => {});
    socket.once('connect', () => socket.write(bytes));
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ sent: bytes.length, closedAfterMs: performance.now() - started });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// the run

export async function runFuzz(options: FuzzOptions): Promise<FuzzReport> {
  const log = options.log;
  const started = performance.now();
  const fixture = await startFuzzServer(options.pointInTimeWeight);
  const { served, oracle, targets } = fixture;
  const pid = served.child.pid!;
  // kept after the run (tempDir's are removed at exit): the sessions to reproduce failures with
  const failureDir = mkdtempSync(join(tmpdir(), 'cowstack-fuzz-failures-'));
  const rssBefore = rssBytes(pid);
  log(`fuzz: server pid ${pid}, RSS ${mib(rssBefore)}; target ${options.frames} mutated frames, ${options.parallel} connections at once, seed ${options.seed}`);

  // ---- the victims
  const stopFile = join(tempDir('fuzz-victim'), 'stop');
  const victim = run('/usr/bin/python3', [join(here, 'fuzz-victim.py'), served.uri('victim'), stopFile, String(options.seed)], { timeoutMs: 3_600_000 * 6 });
  const qemu = { runs: 0, failures: [] as string[], maxMs: 0 };
  let fuzzing = true;
  const qemuLoop = (async () => {
    let i = 0;
    while (fuzzing) {
      const p = (i % 250) + 1;
      const offset = (i * 65536 + (i % 7) * 512) % (15 * MiB);
      const length = 4096 + ((i * 4099) % 60000);
      const t0 = performance.now();
      const r = await run('qemu-io', ['-f', 'raw', '-c', `write -P ${p} ${offset} ${length}`, '-c', `read -P ${p} ${offset} ${length}`, '-c', 'flush', served.uri('victimq')], { timeoutMs: 60_000 }).catch(
        (e: Error) => ({ code: -1, signal: null, stdout: '', stderr: e.message }),
      );
      qemu.maxMs = Math.max(qemu.maxMs, performance.now() - t0);
      qemu.runs++;
      if (r.code !== 0 || /fail|error|mismatch/i.test(r.stdout + r.stderr)) qemu.failures.push(`run ${i}: exit ${r.code}: ${(r.stdout + r.stderr).slice(0, 300)}`);
      i++;
      await sleep(1000);
    }
  })();

  // ---- silent clients: an incomplete handshake and then nothing (no FIN): the handshake timeout
  // (10 s) must close them, fuzzing or not
  const silent = { sessions: 0, closedWithinMs: [] as number[], failures: [] as string[] };
  const silentLoop = (async () => {
    let i = 0;
    const open: Promise<void>[] = [];
    while (fuzzing) {
      const n = i++;
      open.push(
        silentSession(served.socket, n).then((r) => {
          silent.sessions++;
          if (r.closedAfterMs === undefined) silent.failures.push(`silent session ${n} (${r.sent} bytes sent): not closed ${silentWaitMs} ms after connecting`);
          else {
            silent.closedWithinMs.push(r.closedAfterMs);
            if (r.closedAfterMs < limits.defaultHandshakeTimeoutMs - 1000) silent.failures.push(`silent session ${n}: closed after ${r.closedAfterMs.toFixed(0)} ms, before the handshake timeout`);
          }
        }),
      );
      await sleep(2000);
    }
    await Promise.all(open);
  })();

  // ---- the fuzzers
  const tally = {
    connections: 0,
    frames: 0,
    mutated: 0,
    parsed: 0,
    requests: 0,
    bytesSent: 0,
    bytesReceived: 0,
    outcomes: {} as Record<string, number>,
    errnos: {} as Record<string, number>,
    knownBugs: {} as Record<string, number>,
    failures: 0,
    failureKinds: {} as Record<string, number>,
    failureSamples: [] as string[],
    slowest: 0,
  };
  let nextIndex = 0;
  let stop = false;
  const batch = 16;
  const endpoint = { socketPath: served.socket, tcp: fixture.tcp };
  const limitsForClient = { idleTimeoutMs: options.idleTimeoutMs, maxSessionMs: 120_000 };

  const record = (index: number, session: FuzzSession, result: SessionResult, verdict: Verdict | undefined): void => {
    const counts = countFrames(session);
    tally.connections++;
    tally.frames += counts.frames;
    tally.mutated += counts.mutated;
    tally.bytesSent += result.sent.length;
    tally.bytesReceived += result.received.length;
    tally.slowest = Math.max(tally.slowest, result.durationMs);
    let problems: string[] = [];
    let outcome: string;
    if (result.close === 'client-reset') outcome = 'client-reset';
    else if (result.close === 'connect-failed') {
      outcome = 'connect-failed';
      problems = [`connect failed: ${result.error}`];
    } else {
      outcome = verdict!.outcome;
      problems = verdict!.violations;
      tally.parsed += verdict!.options + verdict!.requests;
      tally.requests += verdict!.requests;
      for (const [k, n] of Object.entries(verdict!.errnos)) tally.errnos[k] = (tally.errnos[k] ?? 0) + n;
      for (const [k, n] of Object.entries(verdict!.knownBugs)) tally.knownBugs[k] = (tally.knownBugs[k] ?? 0) + n;
      if (result.close === 'open') outcome = problems.length === 0 ? 'hang (known bug)' : 'hang';
    }
    tally.outcomes[outcome] = (tally.outcomes[outcome] ?? 0) + 1;
    if (problems.length === 0) return;
    tally.failures++;
    const kind = kindOf(problems[0]);
    tally.failureKinds[kind] = (tally.failureKinds[kind] ?? 0) + 1;
    const name = `session-${options.seed}-${index}`;
    if (tally.failureKinds[kind] <= 3) {
      writeFileSync(join(failureDir, `${name}.bin`), result.sent);
      writeFileSync(
        join(failureDir, `${name}.json`),
        JSON.stringify({ seed: options.seed, index, kind: session.kind, transport: session.transport, pieces: session.pieces, close: result.close, outcome, problems, received: result.received.subarray(0, 4096).toString('hex') }, null, 1),
      );
      if (tally.failureSamples.length < 12) tally.failureSamples.push(`${name} (${session.kind}, ${session.transport}, ${result.close}): ${problems.slice(0, 3).join(' | ')}`);
    }
    log(`fuzz: FAIL ${name}: ${problems.slice(0, 2).join(' | ')}`);
  };

  const worker = async (): Promise<void> => {
    while (!stop) {
      const first = nextIndex;
      nextIndex += batch;
      const sessions = generateSessions(targets, options.seed, first, batch);
      for (let i = 0; i < sessions.length && !stop; i++) {
        const session = sessions[i];
        const result = await runSession(session, endpoint, limitsForClient);
        const verdict = result.close === 'client-reset' || result.close === 'connect-failed' ? undefined : judge(result.sent, result.received, result.close, oracle);
        record(first + i, session, result, verdict);
        if (tally.mutated >= options.frames || tally.failures >= options.maxFailures) stop = true;
        if (served.child.exitCode !== null || served.child.signalCode !== null) stop = true;
      }
    }
  };
  const progress = setInterval(() => {
    const s = (performance.now() - started) / 1000;
    log(`fuzz: ${s.toFixed(0)} s: ${tally.connections} connections, ${tally.frames} frames (${tally.mutated} mutated, ${tally.parsed} parsed), ${tally.failures} failures, server RSS ${served.child.exitCode === null ? mib(rssBytes(pid)) : 'gone'}`);
  }, 10_000);
  progress.unref();
  await Promise.all(Array.from({ length: options.parallel }, worker));
  clearInterval(progress);

  // ---- wind down: victims, server, check
  const serverAlive = served.child.exitCode === null && served.child.signalCode === null;
  const rssAfter = serverAlive ? rssBytes(pid) : 0;
  fuzzing = false;
  writeFileSync(stopFile, '');
  const victimResult = await victim.catch((e: Error) => ({ code: -1, signal: null, stdout: '', stderr: e.message }));
  await qemuLoop;
  await silentLoop;
  let victimReport: VictimReport | undefined;
  try {
    victimReport = JSON.parse(victimResult.stdout.trim().split('\n').pop() ?? '') as VictimReport;
  } catch {
    victimReport = undefined;
  }
  let serverExit = 'crashed';
  if (serverAlive) {
    try {
      await served.stop();
      serverExit = '0';
    } catch (e) {
      serverExit = (e as Error).message.split('\n')[0];
    }
  } else serverExit = `exited on its own: ${await served.exited}`;
  const check = await cowstack(['check', fixture.store], { timeoutMs: 600_000 });
  const report: FuzzReport = {
    seed: options.seed,
    seconds: (performance.now() - started) / 1000,
    connections: tally.connections,
    framesSent: tally.frames,
    mutatedFramesSent: tally.mutated,
    framesParsed: tally.parsed,
    requestsParsed: tally.requests,
    bytesSent: tally.bytesSent,
    bytesReceived: tally.bytesReceived,
    outcomes: tally.outcomes,
    errnos: tally.errnos,
    knownBugs: tally.knownBugs,
    failures: tally.failures,
    failureKinds: tally.failureKinds,
    failureSamples: tally.failureSamples,
    failureDir,
    slowestSessionMs: tally.slowest,
    serverRssBeforeBytes: rssBefore,
    serverRssAfterBytes: rssAfter,
    serverAlive,
    serverExit,
    serverLogProblems: serverLogProblems(served.stderr()),
    checkExit: check.code,
    checkOutput: (check.stdout + check.stderr).slice(0, 2000),
    victim: victimReport,
    victimRaw: victimReport === undefined ? (victimResult.stdout + victimResult.stderr).slice(0, 2000) : '',
    qemuIo: qemu,
    silent: { sessions: silent.sessions, maxClosedAfterMs: Math.max(0, ...silent.closedWithinMs), failures: silent.failures },
  };
  return report;
}

/** Every way the run can fail, as messages (empty = pass). */
export function fuzzProblems(report: FuzzReport, options: FuzzOptions): string[] {
  const out: string[] = [];
  if (report.mutatedFramesSent < options.frames) out.push(`only ${report.mutatedFramesSent} of ${options.frames} mutated frames sent`);
  if (report.failures > 0) out.push(`${report.failures} failing sessions: ${JSON.stringify(report.failureKinds)}; samples:\n  ${report.failureSamples.join('\n  ')}\n  (bytes in ${report.failureDir})`);
  if (!report.serverAlive) out.push('the server died during fuzzing');
  if (report.serverRssAfterBytes > options.maxServerRssBytes) out.push(`server RSS ${mib(report.serverRssAfterBytes)} at the end, over ${mib(options.maxServerRssBytes)}`);
  if (report.serverExit !== '0') out.push(`server exit after SIGTERM: ${report.serverExit}`);
  if (report.serverLogProblems.length > 0) out.push(`server log: ${report.serverLogProblems.join(' / ')}`);
  if (report.checkExit !== 0) out.push(`cowstack check exited ${report.checkExit}: ${report.checkOutput}`);
  const v = report.victim;
  if (v === undefined) out.push(`victim client gave no report: ${report.victimRaw}`);
  else {
    if (v.errors.length > 0) out.push(`victim client errors: ${JSON.stringify(v.errors.slice(0, 5))}`);
    if (v.mismatches.length > 0) out.push(`victim client read wrong data: ${JSON.stringify(v.mismatches.slice(0, 5))}`);
    if (v.ops < 100) out.push(`victim client made only ${v.ops} operations`);
    if (v.max_gap_ms > options.idleTimeoutMs) out.push(`victim client stalled for ${v.max_gap_ms} ms`);
  }
  if (report.qemuIo.failures.length > 0) out.push(`qemu-io failures: ${report.qemuIo.failures.slice(0, 3).join(' / ')}`);
  if (report.qemuIo.runs < 3) out.push(`qemu-io ran only ${report.qemuIo.runs} times`);
  if (report.silent.failures.length > 0) out.push(`silent clients: ${report.silent.failures.slice(0, 3).join(' / ')}`);
  return out;
}

export function formatFuzzReport(r: FuzzReport): string {
  const v = r.victim;
  const lines = [
    `fuzz: seed ${r.seed}, ${r.seconds.toFixed(0)} s`,
    `  connections ${r.connections}; frames sent ${r.framesSent} (mutated ${r.mutatedFramesSent}); frames the server had to parse ${r.framesParsed} (requests ${r.requestsParsed}); ${mib(r.bytesSent)} sent, ${mib(r.bytesReceived)} received`,
    `  outcomes: ${Object.entries(r.outcomes)
      .sort((a, b) => b[1] - a[1])
      .map(([k, n]) => `${k} ${n}`)
      .join(', ')}`,
    `  answers: ${Object.entries(r.errnos)
      .sort((a, b) => b[1] - a[1])
      .map(([k, n]) => `${k} ${n}`)
      .join(', ')}`,
    `  known cowstack bugs seen: ${Object.keys(r.knownBugs).length === 0 ? 'none' : JSON.stringify(r.knownBugs)}`,
    `  failing sessions: ${r.failures}${r.failures > 0 ? ` ${JSON.stringify(r.failureKinds)}` : ''}; slowest session ${r.slowestSessionMs.toFixed(0)} ms`,
    `  server RSS ${mib(r.serverRssBeforeBytes)} before, ${mib(r.serverRssAfterBytes)} after; alive ${r.serverAlive}; exit after SIGTERM ${r.serverExit}; cowstack check exit ${r.checkExit}`,
    v === undefined
      ? `  victim: no report`
      : `  libnbd victim: ${v.ops} ops (${v.writes} writes, ${v.fua_writes} FUA, ${v.zeroes} zeroes, ${v.reads} reads, ${v.flushes} flushes) on ${v.connections} connections, ${mib(v.verified_bytes)} verified, ${v.errors.length} errors, ${v.mismatches.length} mismatches; latency p50 ${v.latency_ms.p50} ms p99 ${v.latency_ms.p99} ms max ${v.latency_ms.max} ms; longest gap ${v.max_gap_ms} ms`,
    `  qemu-io victim: ${r.qemuIo.runs} runs, ${r.qemuIo.failures.length} failures, slowest ${r.qemuIo.maxMs.toFixed(0)} ms`,
    `  silent clients (handshake left incomplete, no FIN): ${r.silent.sessions}, closed by the server after at most ${(r.silent.maxClosedAfterMs / 1000).toFixed(1)} s, ${r.silent.failures.length} failures`,
  ];
  if (r.failureSamples.length > 0) lines.push(`  samples:\n    ${r.failureSamples.join('\n    ')}\n  bytes in ${r.failureDir}`);
  return lines.join('\n');
}

/** Regenerates session SEED:INDEX and runs it alone against a fresh server. */
export async function replaySession(seed: number, index: number, pointInTimeWeight = 1): Promise<{ session: FuzzSession; result: SessionResult; verdict: Verdict | undefined; trace: string[] }> {
  const fixture = await startFuzzServer(pointInTimeWeight);
  const [session] = generateSessions(fixture.targets, seed, index, 1);
  const result = await runSession(session, { socketPath: fixture.served.socket, tcp: fixture.tcp }, { idleTimeoutMs: 5000, maxSessionMs: 120_000 });
  const trace: string[] = [];
  const verdict = result.close === 'client-reset' || result.close === 'connect-failed' ? undefined : judge(result.sent, result.received, result.close, fixture.oracle, trace);
  await fixture.served.stop();
  return { session, result, verdict, trace };
}

// ---------------------------------------------------------------------------------------------
// direct run

async function main(argv: readonly string[]): Promise<number> {
  const arg = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const replay = arg('--replay');
  if (replay !== undefined) {
    const [seed, index] = replay.split(':').map(Number);
    const { session, result, verdict, trace } = await replaySession(seed, index);
    if (argv.includes('--trace')) console.log(trace.join('\n'));
    console.log(JSON.stringify({ kind: session.kind, transport: session.transport, bytes: session.stream.length, close: result.close, verdict }, null, 1));
    return verdict === undefined || verdict.violations.length === 0 ? 0 : 1;
  }
  const base = argv.includes('--full') ? fullOptions : ciOptions;
  const options: FuzzOptions = {
    ...base,
    frames: Number(arg('--frames') ?? base.frames),
    parallel: Number(arg('--parallel') ?? base.parallel),
    seed: Number(arg('--seed') ?? base.seed),
    pointInTimeWeight: Number(arg('--pit-weight') ?? base.pointInTimeWeight),
    log: (line) => console.log(line),
  };
  const report = await runFuzz(options);
  console.log(formatFuzzReport(report));
  const problems = fuzzProblems(report, options);
  for (const p of problems) console.log(`FAIL: ${p}`);
  console.log(problems.length === 0 ? 'fuzz: PASS' : `fuzz: FAIL (${problems.length} problems)`);
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
