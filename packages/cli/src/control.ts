/**
 * The control socket: how a command reaches a store that a `cowstack serve` holds. The server
 * listens on a unix socket (mode 0600) and records it, with its pid, in STORE/serve.json; a command
 * that finds the store locked reads that file and sends its operation there, so snapshot, clone,
 * volume create/delete, commit, flatten, import/export, map, diff and journal inspection work online
 * and take effect at once (new exports appear at the next handshake).
 *
 * Protocol: one request per connection, JSON lines. The client sends {op, args, progress}; the server
 * answers with any number of {type: 'progress' | 'item'} lines, then one {type: 'result'} or
 * {type: 'error'} line, and closes. A client that disconnects early aborts a streaming operation; a
 * server that stops answers the clients still connected with an ESHUTDOWN error.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { chmod } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Store } from '@cowstack/core';
import { runOperation } from './operations.js';

/** Unix socket paths longer than this do not fit sockaddr_un on Linux. */
const maxSocketPathBytes = 100;
/** Largest request line a control client may send. */
const maxRequestBytes = 1024 * 1024;

export interface ServeRecord {
  readonly pid: number;
  readonly controlSocket: string;
  readonly exports: string[];
  readonly startedAt: string;
}

export function serveRecordPath(storeDir: string): string {
  return join(storeDir, 'serve.json');
}

export function controlSocketPath(storeDir: string): string {
  const inStore = join(storeDir, 'control.sock');
  if (Buffer.byteLength(inStore) <= maxSocketPathBytes) return inStore;
  const dir = join(tmpdir(), `cowstack-${process.getuid?.() ?? 'user'}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  return join(dir, `${createHash('sha256').update(storeDir).digest('hex').slice(0, 24)}.sock`);
}

/** The record of the server holding the store; one left behind by a server that died (kill -9) is ignored. */
export function readServeRecord(storeDir: string): ServeRecord | undefined {
  let record: ServeRecord;
  try {
    record = JSON.parse(readFileSync(serveRecordPath(storeDir), 'utf8')) as ServeRecord;
  } catch {
    return undefined;
  }
  return isRunning(record.pid) ? record : undefined;
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class ControlError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

export class ControlServer {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  readonly socketPath: string;

  constructor(private readonly store: Store) {
    this.socketPath = controlSocketPath(store.dir);
  }

  async listen(): Promise<void> {
    if (existsSync(this.socketPath)) rmSync(this.socketPath);
    const server = createServer((socket) => this.accept(socket));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    await chmod(this.socketPath, 0o600);
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    const abort = new AbortController();
    socket.on('close', () => {
      this.sockets.delete(socket);
      abort.abort();
    });
    socket.on('error', () => abort.abort());
    let buffered = '';
    let started = false;
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      if (started) return;
      buffered += text;
      if (buffered.length > maxRequestBytes) {
        socket.destroy();
        return;
      }
      const newline = buffered.indexOf('\n');
      if (newline === -1) return;
      started = true;
      void this.handle(socket, buffered.slice(0, newline), abort.signal);
    });
  }

  private async handle(socket: Socket, line: string, signal: AbortSignal): Promise<void> {
    const send = (message: unknown): void => {
      if (!socket.destroyed && !socket.writableEnded) socket.write(`${JSON.stringify(message)}\n`);
    };
    try {
      const request = JSON.parse(line) as { op?: unknown; args?: unknown; progress?: unknown };
      if (typeof request.op !== 'string') throw new ControlError('EINVAL', 'control request has no op');
      const result = await runOperation(
        request.op,
        {
          store: this.store,
          progress: request.progress === true ? (phase, done, total) => send({ type: 'progress', phase, done, total }) : undefined,
          emit: (item) => send({ type: 'item', item }),
          signal,
          served: true,
        },
        (request.args ?? {}) as Record<string, unknown>,
      );
      send({ type: 'result', result });
    } catch (err) {
      send({ type: 'error', error: { code: (err as { code?: string }).code ?? 'EIO', message: (err as Error).message } });
    } finally {
      if (!socket.writableEnded) socket.end();
    }
  }

  /** Stop listening; a client still connected (a `journal tail --follow`, a long operation) is told why. */
  async close(): Promise<void> {
    const stopping = `${JSON.stringify({ type: 'error', error: { code: 'ESHUTDOWN', message: `cowstack serve (pid ${process.pid}) is stopping` } })}\n`;
    for (const socket of this.sockets) {
      if (socket.writableEnded) socket.destroy();
      else socket.end(stopping, () => socket.destroy());
    }
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    rmSync(this.socketPath, { force: true });
  }
}

/** Send one operation to the server holding `storeDir`. */
export function callServer(
  storeDir: string,
  op: string,
  args: Record<string, unknown>,
  handlers: { progress?: (phase: string, done: number, total: number) => void; item?: (item: unknown) => void; signal?: AbortSignal } = {},
): Promise<unknown> {
  const record = readServeRecord(storeDir);
  if (record === undefined) {
    return Promise.reject(new ControlError('ELOCKED', `store ${storeDir} is in use by another process that is not a cowstack serve (another command may be running on it); try again when it has finished`));
  }
  return new Promise((resolve, reject) => {
    const socket = createConnection(record.controlSocket);
    let buffered = '';
    let settled = false;
    const settle = (fn: () => void): void => {
      if (!settled) {
        settled = true;
        fn();
      }
    };
    handlers.signal?.addEventListener('abort', () => {
      socket.destroy();
      settle(() => resolve(undefined));
    });
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(`${JSON.stringify({ op, args, progress: handlers.progress !== undefined })}\n`));
    socket.on('data', (text: string) => {
      buffered += text;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) !== -1) {
        const message = JSON.parse(buffered.slice(0, newline)) as { type: string; [k: string]: unknown };
        buffered = buffered.slice(newline + 1);
        if (message.type === 'progress') handlers.progress?.(message.phase as string, message.done as number, message.total as number);
        else if (message.type === 'item') handlers.item?.(message.item);
        else if (message.type === 'result') settle(() => resolve(message.result));
        else if (message.type === 'error') {
          const error = message.error as { code: string; message: string };
          settle(() => reject(new ControlError(error.code, error.message)));
        }
      }
    });
    socket.on('error', (err) =>
      settle(() =>
        reject(new ControlError('ELOCKED', `store ${storeDir} is held by cowstack serve (pid ${record.pid}), but its control socket ${record.controlSocket} does not answer: ${err.message}`)),
      ),
    );
    socket.on('close', () => settle(() => reject(new ControlError('EIO', `the server holding ${storeDir} closed the control connection without an answer`))));
  });
}

export function writeServeRecord(storeDir: string, record: ServeRecord): void {
  writeFileSync(serveRecordPath(storeDir), `${JSON.stringify(record, null, 2)}\n`, { mode: 0o600 });
}

export function removeServeRecord(storeDir: string): void {
  rmSync(serveRecordPath(storeDir), { force: true });
}
