/**
 * Test helpers: a server on a temporary unix socket, child processes with timeouts, and a raw socket
 * client that reads exact byte counts (for handshake and transmission tests below the real clients).
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ExportProvider } from '@cowstack/core';
import { NbdServer, type NbdServerOptions } from '../src/index.js';
import * as oc from '../src/option-codec.js';
import * as P from '../src/protocol-constants.js';
import * as rc from '../src/reply-codec.js';
import { encodeRequestHeader } from '../src/request-codec.js';

const made: string[] = [];
process.on('exit', () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

export function tempDir(label = 'nbd'): string {
  const dir = mkdtempSync(join(tmpdir(), `cowstack-${label}-`));
  made.push(dir);
  return dir;
}

export interface Started {
  readonly server: NbdServer;
  readonly socketPath: string;
  readonly logs: string[];
  /** nbd+unix URI for an export name. */
  uri(name?: string): string;
}

export async function startServer(provider: ExportProvider, options: Partial<NbdServerOptions> = {}): Promise<Started> {
  const logs: string[] = [];
  const server = new NbdServer({ log: (m) => logs.push(m), ...options, provider });
  const socketPath = join(tempDir('sock'), 'nbd.sock');
  await server.listen({ socketPath });
  return { server, socketPath, logs, uri: (name = '') => `nbd+unix:///${encodeURIComponent(name)}?socket=${socketPath}` };
}

export interface RunResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

export function run(command: string, args: readonly string[], options: { timeoutMs?: number; input?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: options.env ?? process.env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')} timed out after ${options.timeoutMs ?? 60000} ms\n${stdout}\n${stderr}`));
    }, options.timeoutMs ?? 60000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

/** Runs and requires exit 0. */
export async function runOk(command: string, args: readonly string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  const result = await run(command, args, options);
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`);
  return result;
}

/** Runs a Python script with the system interpreter that has libnbd's `nbd` module. */
export async function python(script: string, args: readonly string[] = [], timeoutMs = 60000): Promise<RunResult> {
  const file = join(tempDir('py'), 'script.py');
  writeFileSync(file, script);
  return run('/usr/bin/python3', [file, ...args], { timeoutMs });
}

/** A raw socket that reads exact byte counts. */
export class RawClient {
  private buffer = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  ended = false;
  readonly closed: Promise<void>;

  private constructor(public socket: Socket) {
    this.attach(socket);
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  private readonly onData = (d: Buffer): void => {
    this.buffer = Buffer.concat([this.buffer, d]);
    this.wake();
  };

  private readonly onEnd = (): void => {
    this.ended = true;
    this.wake();
  };

  private attach(socket: Socket): void {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('error', this.onEnd);
  }

  /**
   * After the server acknowledged STARTTLS: runs the TLS client handshake over this socket; from
   * then on reads and writes go through TLS. Rejects when the handshake fails.
   */
  async startTls(options: ConnectionOptions): Promise<TLSSocket> {
    if (this.buffer.length !== 0) throw new Error(`${this.buffer.length} plain bytes left before TLS`);
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('end', this.onEnd);
    plain.off('error', this.onEnd);
    const secure = tlsConnect({ ...options, socket: plain });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    this.socket = secure;
    this.attach(secure);
    return secure;
  }

  static connect(socketPath: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = createConnection(socketPath);
      socket.once('connect', () => resolve(new RawClient(socket)));
      socket.once('error', reject);
    });
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  get available(): number {
    return this.buffer.length;
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Exactly n bytes; rejects on EOF or timeout. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffer.length < n) {
      if (this.ended) throw new Error(`connection ended with ${this.buffer.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buffer.length})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    const out = this.buffer.subarray(0, n);
    this.buffer = this.buffer.subarray(n);
    return out;
  }

  /** Resolves true when the server closes its side within the time, false otherwise. */
  async waitEnd(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return true;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A deterministic pseudo-random buffer. */
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

// ---------------------------------------------------------------------------------------------
// raw protocol steps on a RawClient


export async function readGreeting(c: RawClient): Promise<oc.Greeting> {
  return oc.decodeGreeting(await c.read(18));
}

export async function readOptionReply(c: RawClient): Promise<oc.OptionReply> {
  const header = await c.read(20);
  const payload = await c.read(header.readUInt32BE(16));
  const decoded = oc.decodeOptionReply(Buffer.concat([header, payload]));
  if (decoded === undefined) throw new Error('short option reply');
  return decoded.reply;
}

/** Replies to one option up to and including its final reply (ACK or an error). */
export async function readOptionReplies(c: RawClient): Promise<oc.OptionReply[]> {
  const out: oc.OptionReply[] = [];
  for (;;) {
    const reply = await readOptionReply(c);
    out.push(reply);
    if (reply.reply === P.NBD_REP_ACK || P.isErrorReply(reply.reply)) return out;
  }
}

export async function option(c: RawClient, opt: number, data?: Buffer): Promise<oc.OptionReply[]> {
  c.write(oc.encodeOption(opt, data));
  return readOptionReplies(c);
}

export interface RawSession {
  readonly client: RawClient;
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
}

/** Connects and negotiates to transmission with NBD_OPT_GO. */
export async function rawSession(socketPath: string, opts: { name?: string; structured?: boolean; contexts?: string[] } = {}): Promise<RawSession> {
  const c = await RawClient.connect(socketPath);
  await readGreeting(c);
  c.write(oc.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
  const name = opts.name ?? '';
  if (opts.structured) {
    const sr = await option(c, P.NBD_OPT_STRUCTURED_REPLY);
    if (sr[0].reply !== P.NBD_REP_ACK) throw new Error('structured replies refused');
  }
  if (opts.contexts) await option(c, P.NBD_OPT_SET_META_CONTEXT, oc.encodeMetaContextRequest({ name, queries: opts.contexts }));
  const replies = await option(c, P.NBD_OPT_GO, oc.encodeInfoRequest({ name, infos: [P.NBD_INFO_BLOCK_SIZE] }));
  const last = replies[replies.length - 1];
  if (last.reply !== P.NBD_REP_ACK) throw new Error(`GO failed: 0x${last.reply.toString(16)} ${last.payload.toString()}`);
  const info = replies.map((r) => oc.decodeInfo(r.payload)).find((i) => i?.type === P.NBD_INFO_EXPORT) as { sizeBytes: number; transmissionFlags: number };
  return { client: c, sizeBytes: info.sizeBytes, transmissionFlags: info.transmissionFlags };
}

export function sendRequest(c: RawClient, request: { type: number; flags?: number; cookie: bigint; offset?: number; length?: number }, data?: Buffer): void {
  const header = encodeRequestHeader({ flags: request.flags ?? 0, type: request.type, cookie: request.cookie, offset: request.offset ?? 0, length: request.length ?? data?.length ?? 0 });
  c.write(data ? Buffer.concat([header, data]) : header);
}

export async function readSimpleReply(c: RawClient, dataLength = 0): Promise<{ errno: number; cookie: bigint; data: Buffer }> {
  const header = rc.decodeSimpleReplyHeader(await c.read(16));
  if (header.magic !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error(`bad simple reply magic 0x${header.magic.toString(16)}`);
  const data = header.errno === 0 && dataLength > 0 ? await c.read(dataLength) : Buffer.alloc(0);
  return { errno: header.errno, cookie: header.cookie, data };
}

/** Reads one reply of either kind: a simple reply (no data) or one structured chunk. */
export async function readAnyReply(c: RawClient): Promise<{ simple: true; errno: number; cookie: bigint } | { simple: false; chunk: rc.Chunk }> {
  const head = await c.read(4);
  const magic = head.readUInt32BE(0);
  if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
    const rest = await c.read(12);
    return { simple: true, errno: rest.readUInt32BE(0), cookie: rest.readBigUInt64BE(4) };
  }
  if (magic !== P.NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  const rest = await c.read(16);
  const payload = await c.read(rest.readUInt32BE(12));
  const decoded = rc.decodeChunk(Buffer.concat([head, rest, payload]));
  if (decoded === undefined) throw new Error('short chunk');
  return { simple: false, chunk: decoded.chunk };
}

/** A promise with its resolve function, for gating device operations. */
export function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => (open = resolve));
  return { promise, open };
}
