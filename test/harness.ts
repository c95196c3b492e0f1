/**
 * End-to-end harness: drives the built `cowstack` command and real NBD clients as child processes.
 *
 * - Temporary directories are removed when the test process exits.
 * - Every child process spawned here is tracked; `killAll()` (call it from `after.each`) and the exit
 *   handler SIGKILL whatever is still running, so a failed test never leaves a server or a
 *   qemu-storage-daemon behind for the next one.
 * - Every child has a timeout: uvu has none, so a hung client fails its test instead of the run.
 *
 * The CLI is the built one (packages/cli/bin/cowstack.js → dist), as a user runs it; the root test
 * runner builds first (`npx tsc -b` when running this directory alone).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export const repoRoot = process.env.COWSTACK_ROOT ?? join(dirname(fileURLToPath(import.meta.url)), '..');
export const cliPath = join(repoRoot, 'packages/cli/bin/cowstack.js');

const defaultTimeoutMs = 60_000;
const serveReadyTimeoutMs = 20_000;
const serveStopTimeoutMs = 20_000;

// ---------------------------------------------------------------------------------------------
// temporary directories and child processes

const madeDirs: string[] = [];
const live = new Set<ChildProcess>();
/** FUSE mountpoints of qemu-storage-daemon exports not yet stopped. */
const mounts = new Set<string>();

function unmountLeftovers(): void {
  for (const file of mounts) {
    if (isMounted(file)) spawnSync('umount', ['-l', file], { stdio: 'ignore' });
    mounts.delete(file);
  }
}

process.on('exit', () => {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
  unmountLeftovers();
  for (const dir of madeDirs) {
    try {
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // a FUSE mount still on it: leave it
    }
  }
});

export function tempDir(label = 'e2e'): string {
  const dir = mkdtempSync(join(tmpdir(), `cowstack-${label}-`));
  madeDirs.push(dir);
  return dir;
}

function track(child: ChildProcess): ChildProcess {
  live.add(child);
  child.once('exit', () => live.delete(child));
  return child;
}

/** Spawn a long-running helper (qemu-nbd, ...) that killAll() and the exit handler will end. */
export function spawnTracked(command: string, args: readonly string[]): ChildProcess {
  return track(spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] }));
}

/** SIGKILL every child this harness started that is still running, and wait for them to go. */
export async function killAll(): Promise<void> {
  const waits: Promise<unknown>[] = [];
  for (const child of live) {
    if (child.exitCode !== null || child.signalCode !== null) continue;
    waits.push(new Promise((resolve) => child.once('exit', resolve)));
    child.kill('SIGKILL');
  }
  await within(Promise.all(waits), 5000, undefined);
  unmountLeftovers();
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** `promise`, or `fallback` after `ms` (the timer does not keep the process alive). */
export function within<T, F>(promise: Promise<T>, ms: number, fallback: F): Promise<T | F> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => resolve(fallback), ms);
    timer.unref();
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}

// ---------------------------------------------------------------------------------------------
// running commands

export interface RunResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

export interface RunOptions {
  readonly timeoutMs?: number;
  readonly input?: string | Buffer;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
}

/** Run a command to completion; rejects (after SIGKILL) when it runs past its timeout. */
export function run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? defaultTimeoutMs;
  return new Promise((resolve, reject) => {
    const child = track(spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: options.env ?? process.env, cwd: options.cwd }));
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')} timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin!.on('error', () => {});
    child.stdin!.end(options.input ?? '');
  });
}

export function describe(command: string, args: readonly string[], r: RunResult): string {
  return `${command} ${args.join(' ')} exited ${r.code ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

/** Run and require exit 0. */
export async function runOk(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const r = await run(command, args, options);
  if (r.code !== 0) throw new Error(describe(command, args, r));
  return r;
}

/** The built `cowstack` command. */
export function cowstack(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [cliPath, ...args], options);
}

export async function cowstackOk(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const r = await cowstack(args, options);
  if (r.code !== 0) throw new Error(describe('cowstack', args, r));
  return r;
}

export async function cowstackJson<T = unknown>(args: readonly string[], options: RunOptions = {}): Promise<T> {
  const r = await cowstackOk([...args, '--json'], options);
  return JSON.parse(r.stdout) as T;
}

/** `cowstack init` into a new temporary directory; returns the store path. */
export async function initStore(options: { size?: string; blockSize?: number; base?: string; import?: string; label?: string } = {}): Promise<string> {
  const store = join(tempDir(options.label ?? 'store'), 'store');
  const args = ['init', store];
  if (options.size !== undefined || (options.base === undefined && options.import === undefined)) args.push('--size', options.size ?? '64M');
  if (options.blockSize !== undefined) args.push('--block-size', String(options.blockSize));
  if (options.base !== undefined) args.push('--base', options.base);
  if (options.import !== undefined) args.push('--import', options.import);
  await cowstackOk(args);
  return store;
}

/** Runs a Python script with the system interpreter (it has libnbd's `nbd` module). */
export function python(script: string, args: readonly string[] = [], options: RunOptions = {}): Promise<RunResult> {
  const file = join(tempDir('py'), 'script.py');
  writeFileSync(file, script);
  return run('/usr/bin/python3', [file, ...args], options);
}

export async function pythonOk(script: string, args: readonly string[] = [], options: RunOptions = {}): Promise<RunResult> {
  const r = await python(script, args, options);
  if (r.code !== 0) throw new Error(describe('python3', args, r));
  return r;
}

// ---------------------------------------------------------------------------------------------
// cowstack serve

export interface Served {
  readonly store: string;
  readonly socket: string;
  readonly child: ChildProcess;
  /** nbd+unix URI of an export ('' = the default volume). */
  uri(exportName?: string): string;
  /** Everything the server printed on stderr so far. */
  stderr(): string;
  /** Resolves with the exit code (or signal name) when the server exits. */
  readonly exited: Promise<number | string>;
  /** SIGTERM (or the signal given), then require exit code 0 within the time limit. */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** SIGKILL and wait for the exit. */
  kill(): Promise<void>;
}

export function nbdUri(socket: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName).replace(/%40/g, '@')}?socket=${socket}`;
}

/** Start `cowstack serve STORE --socket SOCK` and wait for its "serving" line. */
export async function startServe(store: string, options: { socket?: string; args?: readonly string[] } = {}): Promise<Served> {
  const socket = options.socket ?? join(tempDir('sock'), 'nbd.sock');
  const args = [cliPath, 'serve', store, '--socket', socket, ...(options.args ?? [])];
  const child = track(spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  let err = '';
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | string>((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal ?? 'unknown')));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`cowstack serve did not become ready in ${serveReadyTimeoutMs} ms\nstderr: ${err}`));
    }, serveReadyTimeoutMs);
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      err += d;
      if (/cowstack: serving /.test(err)) {
        clearTimeout(timer);
        resolve();
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`cowstack serve exited (${code}) before it was ready\nstdout: ${out}\nstderr: ${err}`));
    });
  });
  return {
    store,
    socket,
    child,
    uri: (name = '') => nbdUri(socket, name),
    stderr: () => err,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const code = await within(exited, serveStopTimeoutMs, 'timeout');
      if (code === 'timeout') {
        child.kill('SIGKILL');
        throw new Error(`cowstack serve did not stop within ${serveStopTimeoutMs} ms of ${signal}\nstderr: ${err}`);
      }
      if (code !== 0) throw new Error(`cowstack serve exited ${code} after ${signal} (expected 0)\nstderr: ${err}`);
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// qemu-storage-daemon: an NBD export as a FUSE-mounted regular file

export interface FuseExport {
  readonly file: string;
  /** SIGTERM qsd (it flushes and unmounts) and wait for it to exit 0. */
  stop(): Promise<void>;
}

function isMounted(path: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[4] === path);
}

/** Expose export `exportName` of the server at `socket` as the regular file `file` (created if missing). */
export async function fuseExport(socket: string, exportName: string, file: string, options: { writable: boolean }): Promise<FuseExport> {
  if (!existsSync(file)) writeFileSync(file, '');
  const args = [
    '--blockdev',
    `driver=nbd,node-name=n0,server.type=unix,server.path=${socket},export=${exportName},read-only=${options.writable ? 'off' : 'on'}`,
    '--export',
    `type=fuse,id=e0,node-name=n0,mountpoint=${file},writable=${options.writable ? 'on' : 'off'}`,
  ];
  const child = track(spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  mounts.add(file);
  let output = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  const exited = new Promise<number | string>((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal ?? 'unknown')));
  const deadline = Date.now() + 15_000;
  while (!isMounted(file)) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`qemu-storage-daemon exited: ${output}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`qemu-storage-daemon did not mount ${file}: ${output}`);
    }
    await sleep(50);
  }
  return {
    file,
    async stop() {
      child.kill('SIGTERM');
      const code = await within(exited, 15_000, 'timeout');
      if (code === 'timeout') {
        child.kill('SIGKILL');
        throw new Error(`qemu-storage-daemon did not stop: ${output}`);
      }
      if (code !== 0) throw new Error(`qemu-storage-daemon exited ${code}: ${output}`);
      if (isMounted(file)) throw new Error(`${file} still mounted after qemu-storage-daemon exited`);
      mounts.delete(file);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// data

/** Deterministic pseudo-random bytes (xorshift32). */
export function pattern(length: number, seed = 1): Buffer {
  const out = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** A sparse image: `extents` pseudo-random data runs of varying, unaligned length among holes. */
export function sparseImage(sizeBytes: number, seed = 7, extents = 16): Buffer {
  const image = Buffer.alloc(sizeBytes);
  for (let i = 0; i < extents; i++) {
    const length = 50_000 + ((i * 7919 + seed * 131) % 200_000);
    const offset = ((i * 2654435761 + seed * 40503) >>> 0) % (sizeBytes - length);
    pattern(length, seed * 1000 + i + 1).copy(image, offset);
  }
  return image;
}

/** Byte equality with a message naming the first difference. */
export function sameBytes(actual: Buffer, expected: Buffer, what: string): void {
  if (actual.length !== expected.length) throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  let j = i;
  while (j < actual.length && actual[j] !== expected[j]) j++;
  throw new Error(`${what}: first difference at byte ${i} (0x${i.toString(16)}): got 0x${actual[i].toString(16)}, expected 0x${expected[i].toString(16)}; differing run of ${j - i} bytes`);
}

/** nbdsh with the system Python (the script's `env python3` may find one without libnbd). */
export function nbdsh(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return run('/usr/bin/python3', ['-m', 'nbd', ...args], options);
}

const pythonWriter = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = open(sys.argv[3], 'rb').read()
base = int(sys.argv[2])
for at in range(0, len(data), 4 << 20):   # within the 32 MiB maximum payload
    h.pwrite(data[at:at + (4 << 20)], base + at)
h.flush()
h.shutdown()
`;

/** Write arbitrary bytes at `offset` of an export (libnbd pwrite, then flush). */
export async function writeExport(uri: string, offset: number, data: Buffer): Promise<void> {
  const file = join(tempDir('write'), 'data.bin');
  writeFileSync(file, data);
  await pythonOk(pythonWriter, [uri, String(offset), file]);
  rmSync(file);
}

const pythonReader = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
with open(sys.argv[2], 'wb') as f:
    off = 0
    while off < size:
        n = min(4 << 20, size - off)
        f.write(h.pread(n, off))
        off += n
h.shutdown()
`;

/**
 * Read a whole export into memory: by default with libnbd's pread from Python (plain NBD_CMD_READ,
 * no sparseness tricks), or with nbdcopy or qemu-img when the test wants a second opinion.
 */
export async function readExport(uri: string, options: { via?: 'python' | 'nbdcopy' | 'qemu-img'; timeoutMs?: number } = {}): Promise<Buffer> {
  const file = join(tempDir('read'), 'export.raw');
  const timeoutMs = options.timeoutMs ?? defaultTimeoutMs;
  switch (options.via ?? 'python') {
    case 'python':
      await pythonOk(pythonReader, [uri, file], { timeoutMs });
      break;
    case 'nbdcopy':
      writeFileSync(file, '');
      await runOk('nbdcopy', [uri, file], { timeoutMs });
      break;
    case 'qemu-img':
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, file], { timeoutMs });
      break;
  }
  const data = readFileSync(file);
  rmSync(file);
  return data;
}
