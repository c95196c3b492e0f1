/**
 * Test helpers for driving the built `cowstack` command as a subprocess: temporary directories,
 * child processes with timeouts that are all killed when the test process exits (even when a test
 * fails), a `cowstack serve` handle, and the real NBD clients (nbdinfo, qemu-io, nbdcopy, libnbd's
 * Python binding) used to write and read what the server exports.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const cliBin = join(repoRoot, 'packages', 'cli', 'bin', 'cowstack.js');

/** A command that has not finished after this long is killed and the test fails. */
const defaultCommandTimeoutMs = 60_000;
/** How long a starting `cowstack serve` may take to print its "serving" line. */
const serveStartTimeoutMs = 20_000;
/** How long a stopping `cowstack serve` may take to exit after SIGINT. */
const serveStopTimeoutMs = 20_000;

if (!existsSync(join(repoRoot, 'packages', 'cli', 'dist', 'main.js'))) {
  throw new Error('packages/cli/dist is missing: run `npx tsc -b` before the CLI tests');
}

const children = new Set<ChildProcess>();
const made: string[] = [];

function killChildren(): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}
process.on('exit', () => {
  killChildren();
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    killChildren();
    process.exit(130);
  });
}

export function tempDir(label = 'cli'): string {
  const dir = mkdtempSync(join(tmpdir(), `cowstack-${label}-`));
  made.push(dir);
  return dir;
}

export interface RunResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

export interface RunOptions {
  readonly timeoutMs?: number;
  readonly input?: string;
  readonly cwd?: string;
}

/** Start a tracked child process (killed when the test process exits). */
export function start(command: string, args: readonly string[], cwd?: string): ChildProcess {
  const env = { ...process.env };
  delete env.COWSTACK_DEBUG;
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env, cwd });
  // A child that exits before reading its stdin must not take the test process down with EPIPE.
  child.stdin!.on('error', () => {});
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/** Collect a child's output until it exits. */
export function finish(child: ChildProcess, what: string, timeoutMs = defaultCommandTimeoutMs): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${what} timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

export function run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const child = start(command, args, options.cwd);
  const done = finish(child, `${command} ${args.join(' ')}`, options.timeoutMs);
  child.stdin?.end(options.input ?? '');
  return done;
}

export async function runOk(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const r = await run(command, args, options);
  if (r.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** Run `cowstack ARGS`. */
export function cow(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [cliBin, ...args], options);
}

export function cowArgs(args: readonly string[]): string[] {
  return [process.execPath, cliBin, ...args];
}

/** Run `cowstack ARGS` and require exit 0. */
export async function cowOk(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const r = await cow(args, options);
  if (r.code !== 0) throw new Error(`cowstack ${args.join(' ')} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/**
 * Run `cowstack ARGS --json`, require exit 0, and parse stdout: it must be exactly one JSON document
 * with nothing else around it, and stderr must be empty (no progress bar, no notes).
 */
export async function cowJson<T = any>(args: readonly string[], options: RunOptions = {}): Promise<T> {
  const r = await cowOk([...args, '--json'], options);
  if (r.stderr !== '') throw new Error(`cowstack ${args.join(' ')} --json wrote to stderr: ${r.stderr}`);
  try {
    return JSON.parse(r.stdout) as T;
  } catch (err) {
    throw new Error(`cowstack ${args.join(' ')} --json printed something that is not one JSON document: ${(err as Error).message}\n${r.stdout}`);
  }
}

/** Parse JSON lines (journal inspect/tail --json); every non-empty line must be a JSON object. */
export function jsonLines<T = any>(text: string): T[] {
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as T);
}

/** Messages a user should never see: a JavaScript stack or a raw LevelDB error. */
export function assertNoStack(text: string, what: string): void {
  if (/\n\s+at .+:\d+:\d+\)?/.test(text) || /LEVEL_|LevelDB|IO error: lock/i.test(text)) {
    throw new Error(`${what} printed a stack trace or a raw LevelDB error:\n${text}`);
  }
}

export async function waitFor<T>(what: string, probe: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 10_000, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A running `cowstack serve STORE --socket SOCK`. */
export class Server {
  stderr = '';
  stdout = '';
  private readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private constructor(
    readonly store: string,
    readonly socket: string,
    readonly child: ChildProcess,
  ) {
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (this.stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (this.stderr += d));
    this.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  }

  static async start(store: string, extra: readonly string[] = []): Promise<Server> {
    const socket = join(tempDir('sock'), 'nbd.sock');
    const child = start(process.execPath, [cliBin, 'serve', store, '--socket', socket, ...extra]);
    child.stdin!.end();
    const server = new Server(store, socket, child);
    await Promise.race([
      waitFor('cowstack serve to start', () => /serving .* on /.test(server.stderr), serveStartTimeoutMs),
      server.exited.then(({ code }) => {
        throw new Error(`cowstack serve exited ${code} while starting:\n${server.stderr}`);
      }),
    ]);
    return server;
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** nbd+unix URI of an export. */
  uri(name = ''): string {
    return `nbd+unix:///${encodeURIComponent(name)}?socket=${this.socket}`;
  }

  /** http://ADDR:PORT/metrics, from the line serve logs when started with --metrics. */
  get metricsUrl(): string {
    const m = /metrics on (http:\/\/\S+\/metrics)/.exec(this.stderr);
    if (m === null) throw new Error(`serve logged no metrics address:\n${this.stderr}`);
    return m[1];
  }

  /** SIGINT, then wait for a clean exit; returns the exit code. */
  async stop(): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.child.exitCode;
    this.child.kill('SIGINT');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), serveStopTimeoutMs);
    const { code } = await this.exited;
    clearTimeout(timer);
    return code;
  }

  /** kill -9, as a crash. */
  async crash(): Promise<void> {
    this.child.kill('SIGKILL');
    const { signal } = await this.exited;
    if (signal !== 'SIGKILL') throw new Error(`serve exited with ${signal} instead of being killed`);
  }
}

/** Stop every server in the list, whatever state each is in (for `finally` blocks). */
export async function stopAll(servers: readonly (Server | undefined)[]): Promise<void> {
  await Promise.all(servers.map((s) => s?.stop().catch(() => undefined)));
}

/** Export names a server lists, by `nbdinfo --list --json`. */
export async function listExports(server: Server): Promise<Array<{ name: string; readOnly: boolean; size: number }>> {
  const r = await runOk('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${server.socket}`], { timeoutMs: 15_000 });
  const info = JSON.parse(r.stdout) as { exports: Array<Record<string, unknown>> };
  return info.exports.map((e) => ({ name: e['export-name'] as string, readOnly: e.is_read_only as boolean, size: e['export-size'] as number }));
}

/** Run qemu-io commands against an export; requires success. */
export function qemuIo(uri: string, commands: readonly string[]): Promise<RunResult> {
  return runOk('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 30_000 });
}

/** Copy a whole export to a local file with nbdcopy and return its bytes. */
export async function readExport(uri: string): Promise<Buffer> {
  const file = join(tempDir('copy'), 'export.raw');
  await runOk('nbdcopy', [uri, file], { timeoutMs: 30_000 });
  return readFileSync(file);
}

/** Start a Python script that has libnbd's `nbd` module (tracked, stdin left open). */
export function startPython(script: string, args: readonly string[] = []): ChildProcess {
  const file = join(tempDir('py'), 'script.py');
  writeFileSync(file, script);
  return start('/usr/bin/python3', [file, ...args]);
}

/** A deterministic pseudo-random buffer (xorshift32), so expected images need no files. */
export function pseudoRandom(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out.writeUInt32LE(x, i);
  }
  return out;
}

/** The first offset where two buffers differ, for readable failures. */
export function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

export function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  if (at !== -1) {
    throw new Error(`${what}: bytes differ first at offset ${at} (0x${at.toString(16)}); got ${actual.length} bytes, expected ${expected.length}`);
  }
}
