/**
 * Shared pieces of the reliability harnesses: the libnbd load clients of the crash torture and their
 * records, the model that says what a region may hold after a crash, a multi-export reader, child
 * process bookkeeping and a seeded random source.
 *
 * The model. Each load client owns a set of regions (byte ranges of one volume; neighbouring regions
 * belong to different clients and may share blocks). It keeps at most one command in flight per
 * region, so a region's history is a sequence of operations o1, o2, ... each issued after the previous
 * one completed. Let S(k) be the initial bytes of the region with o1..ok applied. Then:
 *   - after a crash, a region holds S(n) where on is its last acknowledged operation, or S(n+1) if
 *     o(n+1) was in flight at the kill (issued, not acknowledged), whole: never a mix;
 *   - a snapshot whose command ran over [t0, t1] holds, per region, S(k) for some k with every
 *     operation acknowledged before t0 included and none issued after t1 included.
 * Write contents are unique (client, op, region, trial seed), so a failure names the write found.
 * Write-zeroes makes its range read as zeroes; trim zeroes the whole blocks inside its range and
 * leaves partial blocks at its edges alone (cowstack's documented trim).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pythonOk, tempDir } from '../harness.js';

const here = dirname(fileURLToPath(import.meta.url));
export const clientScript = join(here, 'torture-client.py');
/** Debian's interpreter: it has libnbd's `nbd` module (the python3 on PATH may not). */
export const systemPython = '/usr/bin/python3';

// ---------------------------------------------------------------------------------------------
// random

/** A small seeded PRNG (mulberry32): trials are reproducible in their choices, not their timing. */
export class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0 || 0x9e3779b9;
  }
  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  range(lo: number, hi: number): number {
    return lo + this.next() * (hi - lo);
  }
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1));
      [items[i], items[j]] = [items[j], items[i]];
    }
    return items;
  }
}

// ---------------------------------------------------------------------------------------------
// child processes this module starts (the harness's own tracking does not give us stdout)

const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {
      // gone
    }
  }
});

export function spawnChild(command: string, args: readonly string[]): ChildProcess {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** SIGKILL every child this module started that still runs (by its own handle, nothing broader). */
export async function killChildren(): Promise<void> {
  const waits: Promise<unknown>[] = [];
  for (const child of children) {
    if (child.exitCode !== null || child.signalCode !== null) continue;
    waits.push(new Promise((resolve) => child.once('exit', resolve)));
    child.kill('SIGKILL');
  }
  await Promise.all(waits);
}

// ---------------------------------------------------------------------------------------------
// regions, contents and the model

export interface Region {
  readonly id: number;
  readonly start: number;
  readonly length: number;
}

/** Regions of `regionBytes` (the last one shorter) covering [0, zoneBytes). */
export function layoutRegions(zoneBytes: number, regionBytes: number): Region[] {
  const out: Region[] = [];
  for (let start = 0, id = 0; start < zoneBytes; start += regionBytes, id++) out.push({ id, start, length: Math.min(regionBytes, zoneBytes - start) });
  return out;
}

/** The bytes of write `op` of `client` on `region`: a 16-byte unit repeated (torture-client.py's content()). */
export function writeContent(client: number, op: number, region: number, seed: number, length: number): Buffer {
  const unit = Buffer.alloc(16);
  unit.writeUInt32LE((0xc0570000 + client) >>> 0, 0);
  unit.writeUInt32LE(op >>> 0, 4);
  unit.writeUInt32LE(region >>> 0, 8);
  unit.writeUInt32LE(seed >>> 0, 12);
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i += 16) unit.copy(out, i, 0, Math.min(16, length - i));
  return out;
}

/** Names the write whose unit sits at `at` of `bytes`, if any (for failure messages). */
export function describeBytesAt(bytes: Buffer, at: number): string {
  const aligned = at - (at % 16);
  if (aligned + 16 > bytes.length) return `0x${bytes[at]?.toString(16)}`;
  const magic = bytes.readUInt32LE(aligned);
  if (magic >>> 16 === 0xc057) return `a unit of client ${magic & 0xffff} op ${bytes.readUInt32LE(aligned + 4)} region ${bytes.readUInt32LE(aligned + 8)}`;
  if (bytes.subarray(aligned, aligned + 16).every((b) => b === 0)) return 'zeroes';
  return `bytes ${bytes.subarray(aligned, aligned + 16).toString('hex')}`;
}

export type OpKind = 'w' | 'z' | 't' | 'f';

export interface OpRecord {
  readonly client: number;
  readonly op: number;
  readonly region: number;
  readonly kind: OpKind;
  readonly offset: number;
  readonly length: number;
  readonly fua: boolean;
  /** Wall-clock ms, taken before the request was sent. */
  readonly issuedMs: number;
  /** Wall-clock ms, taken after libnbd reported success; undefined if never acknowledged. */
  ackedMs?: number;
  /** Set when the command completed with an error. */
  error?: { atMs: number; message: string };
}

/** Apply one operation to `buf`, which holds the bytes [bufStart, bufStart + buf.length) of the volume. */
export function applyOp(buf: Buffer, bufStart: number, op: OpRecord, seed: number, blockSize: number): void {
  const from = op.offset - bufStart;
  switch (op.kind) {
    case 'w':
      writeContent(op.client, op.op, op.region, seed, op.length).copy(buf, from);
      break;
    case 'z':
      buf.fill(0, from, from + op.length);
      break;
    case 't': {
      const first = Math.ceil(op.offset / blockSize) * blockSize;
      const end = Math.floor((op.offset + op.length) / blockSize) * blockSize;
      if (end > first) buf.fill(0, first - bufStart, end - bufStart);
      break;
    }
    case 'f':
      break;
  }
}

function firstDifference(a: Buffer, b: Buffer): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/**
 * Check one region: `actual` must equal S(k) for some k in [kMin, kMax] (S as in the header). Returns
 * the k found, or a message saying what the region holds instead.
 */
export function matchRegion(
  initial: Buffer,
  region: Region,
  ops: readonly OpRecord[],
  kMin: number,
  kMax: number,
  actual: Buffer,
  seed: number,
  blockSize: number,
): { k: number } | { error: string } {
  const state = Buffer.from(initial);
  let closest = -1;
  let closestAt = -1;
  for (let k = 0; k <= Math.min(kMax, ops.length); k++) {
    if (k > 0) applyOp(state, region.start, ops[k - 1], seed, blockSize);
    if (k < kMin) continue;
    const at = firstDifference(actual, state);
    if (at === -1) return { k };
    if (at > closestAt) {
      closestAt = at;
      closest = k;
    }
  }
  const describeOp = (o: OpRecord): string =>
    `${o.kind === 'w' ? 'write' : o.kind === 'z' ? 'write-zeroes' : 'trim'} op ${o.op} [${o.offset}, +${o.length})${o.fua ? ' FUA' : ''} ${o.ackedMs !== undefined ? 'acknowledged' : 'not acknowledged'}`;
  const history = ops.map((o, i) => `    ${i + 1}. ${describeOp(o)}`).join('\n');
  const where = closestAt === -1 ? 'no candidate state' : `byte ${region.start + closestAt} (closest candidate S(${closest}))`;
  return {
    error: `region ${region.id} [${region.start}, +${region.length}) holds none of S(${kMin})..S(${Math.min(kMax, ops.length)}): first difference at ${where}: found ${describeBytesAt(actual, Math.max(0, closestAt))}; history:\n${history || '    (no operations)'}`,
  };
}

// ---------------------------------------------------------------------------------------------
// load clients

export interface ClientConfig {
  readonly uri: string;
  readonly client: number;
  readonly regions: ReadonlyArray<readonly [id: number, start: number, length: number]>;
  readonly depth: number;
  readonly blockSize: number;
  /** Seeds the client's choices. */
  readonly seed: number;
  /** Goes into every write's content (the trial's seed). */
  readonly contentSeed: number;
  /** Weights: plain write, FUA write, write-zeroes, trim, flush. */
  readonly mix: readonly [number, number, number, number, number];
  readonly maxSeconds: number;
}

export interface ClientRun {
  readonly config: ClientConfig;
  readonly ops: Map<number, OpRecord>;
  /** Resolves once the client connected (its H line) or rejects if it exits first. */
  readonly connected: Promise<void>;
  /** Resolves when the client exited and every line it printed was read. */
  readonly done: Promise<{ code: number | null; stderr: string; end: string | undefined }>;
  readonly child: ChildProcess;
}

export function startClient(config: ClientConfig): ClientRun {
  const child = spawnChild(systemPython, [clientScript, JSON.stringify(config)]);
  const ops = new Map<number, OpRecord>();
  let buffered = '';
  let stderr = '';
  let end: string | undefined;
  let onConnected!: () => void;
  let onFailed!: (e: Error) => void;
  const connected = new Promise<void>((resolve, reject) => {
    onConnected = resolve;
    onFailed = reject;
  });
  connected.catch(() => undefined);
  const line = (text: string): void => {
    const f = text.split(' ');
    switch (f[0]) {
      case 'H':
        if (f.slice(1, 5).join(' ') !== '1 1 1 1') {
          onFailed(new Error(`client ${config.client}: the server does not offer trim, write-zeroes, FUA and flush: ${text}`));
        } else onConnected();
        break;
      case 'I':
        ops.set(Number(f[1]), {
          client: config.client,
          op: Number(f[1]),
          region: Number(f[2]),
          kind: f[3] as OpKind,
          offset: Number(f[4]),
          length: Number(f[5]),
          fua: f[6] === '1',
          issuedMs: Number(f[7]) * 1000,
        });
        break;
      case 'A': {
        const op = ops.get(Number(f[1]));
        if (op !== undefined) op.ackedMs = Number(f[2]) * 1000;
        break;
      }
      case 'E': {
        const op = ops.get(Number(f[1]));
        if (op !== undefined) op.error = { atMs: Number(f[2]) * 1000, message: f.slice(3).join(' ') };
        break;
      }
      case 'X':
        end = f.slice(2).join(' ');
        break;
    }
  };
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    buffered += d;
    const lines = buffered.split('\n');
    buffered = lines.pop()!;
    for (const l of lines) if (l.length > 0) line(l);
  });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const done = new Promise<{ code: number | null; stderr: string; end: string | undefined }>((resolve) =>
    child.on('close', (code) => {
      if (buffered.length > 0) line(buffered);
      onFailed(new Error(`client ${config.client} exited (${code}) before connecting: ${stderr}`));
      resolve({ code, stderr, end });
    }),
  );
  return { config, ops, connected, done, child };
}

// ---------------------------------------------------------------------------------------------
// reading exports

const readerScript = String.raw`
import nbd, sys
socket = sys.argv[1]
pairs = sys.argv[2:]
for i in range(0, len(pairs), 2):
    name, path = pairs[i], pairs[i + 1]
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(socket)
    size = h.get_size()
    with open(path, 'wb') as f:
        off = 0
        while off < size:
            n = min(4 << 20, size - off)
            f.write(h.pread(n, off))
            off += n
    h.shutdown()
`;

/** Read whole exports of the server at `socket` (plain NBD_CMD_READ through libnbd), one process. */
export async function readExports(socket: string, names: readonly string[]): Promise<Map<string, Buffer>> {
  const dir = tempDir('read');
  const paths = names.map((_, i) => join(dir, `${i}.raw`));
  try {
    await pythonOk(readerScript, [socket, ...names.flatMap((n, i) => [n, paths[i]])], { timeoutMs: 120_000 });
    return new Map(names.map((n, i) => [n, readFileSync(paths[i])]));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const lockHolderScript = String.raw`
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
sys.stdout.write('ready\n'); sys.stdout.flush()
sys.stdin.readline()
while True:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except OSError:
        time.sleep(0.0002)
sys.stdout.write('locked\n'); sys.stdout.flush()
sys.stdin.read()
`;

/**
 * Takes the journal's LevelDB lock (fcntl, as LevelDB does) the moment the killed server lets go of
 * it, so that a CLI command the driver started just before the kill cannot open the store itself
 * and recover it: recovery is left to `cowstack recover`. Such a command then fails ("in use"),
 * which the driver counts as an unknown outcome.
 */
export interface LockHolder {
  /** Start taking the lock (call right when the server is killed). */
  grab(): void;
  /** Resolves once the lock is held. */
  readonly held: Promise<void>;
  release(): Promise<void>;
}

export async function lockHolder(lockFile: string): Promise<LockHolder> {
  const child = spawn(systemPython, ['-c', lockHolderScript, lockFile], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  const exited = new Promise<void>((resolve) =>
    child.once('exit', () => {
      children.delete(child);
      resolve();
    }),
  );
  let out = '';
  let onReady!: () => void;
  let onHeld!: () => void;
  const ready = new Promise<void>((resolve) => (onReady = resolve));
  const held = new Promise<void>((resolve) => (onHeld = resolve));
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    if (out.includes('ready\n')) onReady();
    if (out.includes('locked\n')) onHeld();
  });
  child.stdin!.on('error', () => undefined);
  await Promise.race([ready, exited.then(() => Promise.reject(new Error(`lock holder exited early: ${out}`)))]);
  return {
    grab: () => child.stdin!.write('go\n'),
    held,
    async release() {
      child.stdin!.end();
      await exited;
    },
  };
}

/** Allocated bytes of a file (0 if it does not exist). */
export function allocatedBytes(path: string): number {
  if (!existsSync(path)) return 0;
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}
