/**
 * NbdServer: listens on a unix socket or TCP port and runs one Connection per client. A connection
 * starts in the handshake (handshake.ts, a pure state machine fed from a ByteQueue) and, once the
 * client has chosen an export, hands the same queue to the transmission phase (transmission.ts).
 *
 * TLS: when the handshake acknowledges STARTTLS, the connection stops reading the plain socket, wraps
 * it (tls-upgrade.ts) and, once the TLS handshake succeeds, feeds the handshake and then the
 * transmission from the TLS socket; replies go out through it too. A failed TLS handshake closes that
 * connection with a log line. The handshake timeout covers the TLS handshake.
 *
 * Isolation: every socket event handler catches everything; a client's misbehaviour or a device's
 * unexpected exception ends that connection only, never the process or another connection.
 *
 * Closing: a clean disconnect sends FIN after every reply already written, keeps the connection while
 * the client keeps reading them (cut off after replyStallMs without progress), then waits
 * closeGraceMs for the client to close before destroying the socket. close() stops listening, lets handshaking clients
 * finish with NBD_REP_ERR_SHUTDOWN replies for a short grace period, and lets transmitting clients
 * finish the requests in flight (new ones get NBD_ESHUTDOWN) before disconnecting them; a
 * connection still busy after shutdownTimeoutMs is destroyed.
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { chmod, lstat, unlink } from 'node:fs/promises';
import type { ExportProvider } from '@cowstack/core';
import { ByteQueue } from './byte-queue.js';
import { errorMessageOf } from './errno-table.js';
import { assert, NbdServerError } from './errors.js';
import { Handshake, type HandshakeLimits } from './handshake.js';
import {
  defaultHandshakeTimeoutMs,
  defaultMaxConnections,
  defaultMaxInflightRequestsPerConnection,
  defaultMaxOptionBytes,
  defaultMaxOptionsPerHandshake,
  defaultMaxPayloadBytes,
  shutdownTimeoutMs,
} from './limits.js';
import { resolveTls, type ResolvedTls, type TlsOptions } from './tls-config.js';
import { upgradeToTls } from './tls-upgrade.js';
import { Transmission, type TransmissionOptions } from './transmission.js';

export interface NbdServerOptions {
  readonly provider: ExportProvider;
  /** A client must have chosen an export within this time (default 10 s). */
  readonly handshakeTimeoutMs?: number;
  /** Options a client may send before choosing an export (default 32, plus 4 per export listed). */
  readonly maxOptionsPerHandshake?: number;
  /** Largest option payload parsed (default 64 KiB); longer ones get NBD_REP_ERR_TOO_BIG. */
  readonly maxOptionBytes?: number;
  /** Largest READ/WRITE payload, advertised in NBD_INFO_BLOCK_SIZE (default 32 MiB). */
  readonly maxPayloadBytes?: number;
  /** Requests served at once per connection (default 64); reading pauses at this many. */
  readonly maxInflightRequestsPerConnection?: number;
  /** Concurrent connections (default 256); more are closed at once. */
  readonly maxConnections?: number;
  /** Receives one line per notable event (connections, protocol violations, unexpected errors). */
  readonly log?: (message: string) => void;
  /** Called once per answered request: command name ('READ', ...), its length, and latency. */
  readonly onRequest?: (command: string, bytes: number, latencyMs: number) => void;
  /**
   * TLS through NBD_OPT_STARTTLS (default off). `on`: clients may upgrade; `require`: nothing but
   * STARTTLS and ABORT before they do. Credentials are read when the server is constructed.
   */
  readonly tls?: TlsOptions;
}

export type ListenTarget = { readonly socketPath: string; readonly socketMode?: number } | { readonly port: number; readonly host: string };
export type NbdAddress = { readonly socketPath: string } | { readonly host: string; readonly port: number };

/** How long a cleanly closed connection waits for the client to close before it is destroyed. */
const closeGraceMs = 2000;
/** A closing connection whose client reads none of the replies still queued for this long is cut off. */
const replyStallMs = 10_000;
/** How long handshaking clients get to leave after close() before they are destroyed. */
const handshakeShutdownGraceMs = 2000;

function positiveInteger(name: string, value: number | undefined, fallback: number, min = 1, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < min || value > max) throw new NbdServerError('EINVAL', `${name} must be an integer from ${min} to ${max}, got ${value}`);
  return value;
}

class Connection {
  readonly queue = new ByteQueue();
  handshake: Handshake | undefined;
  transmission: Transmission | undefined;
  /** Where NBD bytes are read and written: the accepted socket, or the TLS socket over it. */
  private socket: Socket;
  private timer: NodeJS.Timeout | undefined;
  private closing = false;
  /** STARTTLS acknowledged and the TLS handshake not finished: nothing is read meanwhile. */
  private upgrading = false;
  readonly closed: Promise<void>;
  private readonly onDataListener = (chunk: Buffer): void => this.guard(() => this.onData(chunk));
  private readonly onEndListener = (): void => this.guard(() => this.onEnd());
  private readonly onErrorListener = (error: NodeJS.ErrnoException): void => {
    // a client that goes away without a goodbye is routine; anything else is worth a line
    if (error.code !== 'EPIPE' && error.code !== 'ECONNRESET') this.log(`socket error: ${error.message}`);
    this.socket.destroy();
  };

  constructor(
    private readonly raw: Socket,
    readonly id: number,
    private readonly server: NbdServer,
    private readonly config: ResolvedConfig,
  ) {
    this.socket = raw;
    // The accepted socket closes last (a TLS socket closes its transport), so it tracks the lifetime.
    this.closed = new Promise((resolve) => raw.once('close', () => resolve()));
    raw.setNoDelay(true);
    this.listen(raw);
    raw.once('close', () => {
      clearTimeout(this.timer);
      this.server.forget(this);
    });
    const peer = raw.remoteAddress === undefined ? 'unix' : `${raw.remoteAddress}:${raw.remotePort}`;
    this.handshake = new Handshake(config.provider, config.limits, (bytes) => this.write(bytes), (message) => this.log(message), config.tls.mode, { id, peer });
    this.timer = setTimeout(() => this.destroy(`no export chosen within ${config.handshakeTimeoutMs} ms`), config.handshakeTimeoutMs);
    this.write(this.handshake.greeting());
  }

  private listen(socket: Socket): void {
    socket.on('data', this.onDataListener);
    socket.on('end', this.onEndListener);
    socket.on('error', this.onErrorListener);
  }

  log(message: string): void {
    this.config.log(`nbd connection ${this.id}: ${message}`);
  }

  private guard(fn: () => void): void {
    try {
      fn();
    } catch (error) {
      this.log(`internal error: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
      this.destroy('internal error');
    }
  }

  private write(bytes: Buffer): void {
    if (!this.socket.destroyed && !this.socket.writableEnded) this.socket.write(bytes);
  }

  private onData(chunk: Buffer): void {
    if (this.closing) return;
    assert(!this.upgrading, 'plain bytes read during the TLS upgrade');
    this.queue.push(chunk);
    if (this.transmission !== undefined) {
      this.transmission.receive();
      return;
    }
    const handshake = this.handshake;
    if (handshake === undefined) return;
    const step = handshake.consume(this.queue);
    if (step.kind === 'starttls') {
      assert(this.queue.length === 0, 'bytes queued behind an acknowledged STARTTLS');
      this.startTls(handshake);
    } else if (step.kind === 'close') {
      this.handshake = undefined;
      if (!step.soft) this.log(`handshake ended: ${step.reason}`);
      this.end(step.reason);
    } else if (step.kind === 'transmission') {
      this.handshake = undefined;
      clearTimeout(this.timer);
      this.timer = undefined;
      const { negotiated } = step;
      const contexts = negotiated.metaContexts.map((c) => c.name).join(',') || 'none';
      this.log(`serving export '${negotiated.exportName}' (TLS: ${negotiated.tls}, structured replies: ${negotiated.structuredReplies}, contexts: ${contexts})`);
      this.transmission = new Transmission(this.socket, this.queue, negotiated, this.config.transmission, {
        end: (reason) => this.end(reason),
        destroy: (reason) => this.destroy(reason),
      });
      if (this.server.isClosing) this.transmission.shutdown();
      else this.transmission.receive();
    }
  }

  /** Stops reading the plain socket, runs the TLS handshake, then resumes the NBD handshake over TLS. */
  private startTls(handshake: Handshake): void {
    const options = this.config.tls.serverOptions;
    assert(options !== undefined, 'STARTTLS acknowledged without TLS credentials');
    this.upgrading = true;
    const raw = this.raw;
    raw.off('data', this.onDataListener);
    raw.off('end', this.onEndListener);
    upgradeToTls(raw, options, this.config.handshakeTimeoutMs, {
      secure: (socket, session) =>
        this.guard(() => {
          this.upgrading = false;
          if (this.closing || raw.destroyed) {
            socket.destroy();
            return;
          }
          this.log(`TLS established (${session})`);
          this.socket = socket;
          this.listen(socket);
          handshake.tlsEstablished();
        }),
      failed: (reason) =>
        this.guard(() => {
          this.upgrading = false;
          if (this.closing) return;
          // logged here: the socket may be closed already (a client that gave up), and then
          // destroy() has nothing to say
          this.log(`TLS handshake failed: ${reason}`);
          this.hardClose();
        }),
    });
  }

  private onEnd(): void {
    if (this.transmission !== undefined) this.transmission.inputEnded();
    else this.end('client closed the connection during the handshake');
  }

  /**
   * Clean disconnect: FIN after the replies already written, then destroy if the client does not
   * close within closeGraceMs of the last byte leaving. A client still reading its replies (a slow
   * reader of large READs) keeps the connection as long as it makes progress; one that stops
   * reading for replyStallMs is cut off.
   */
  end(reason: string): void {
    if (this.closing) return;
    this.closing = true;
    this.handshake = undefined;
    clearTimeout(this.timer);
    const socket = this.socket;
    if (this.raw.destroyed) {
      // The client went away first (its requests in flight finished after the close): nothing to
      // flush and no timer to arm, which would only keep a stopping server alive.
      this.log(`closed: ${reason}`);
      return;
    }
    const destroy = (): void => {
      socket.destroy();
      this.raw.destroy();
    };
    // Progress: the replies still buffered here shrink as the client reads.
    let queued = socket.writableLength;
    const watch = (): void => {
      if (socket.destroyed) return;
      if (socket.writableFinished) {
        this.timer = setTimeout(destroy, closeGraceMs);
        return;
      }
      const progressed = socket.writableLength < queued;
      queued = socket.writableLength;
      this.timer = progressed ? setTimeout(watch, replyStallMs) : setTimeout(destroy, 0);
    };
    socket.once('finish', () => {
      clearTimeout(this.timer);
      if (this.raw.destroyed) return;
      this.timer = setTimeout(destroy, closeGraceMs);
    });
    this.timer = setTimeout(watch, replyStallMs);
    socket.resume(); // keep reading so the client's close is seen
    if (!socket.destroyed) socket.end();
    this.log(`closing: ${reason}`);
  }

  /** Hard disconnect. */
  destroy(reason: string): void {
    if (!this.raw.destroyed) this.log(`disconnecting: ${reason}`);
    this.hardClose();
  }

  private hardClose(): void {
    this.closing = true;
    this.handshake = undefined;
    this.socket.destroy();
    this.raw.destroy();
  }

  /** Server close(): see the file's design note. */
  shutdown(): void {
    if (this.closing) return;
    if (this.transmission !== undefined) {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.destroy(`still busy ${shutdownTimeoutMs} ms after shutdown`), shutdownTimeoutMs);
      this.transmission.shutdown();
    } else {
      this.handshake?.shutdown();
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.destroy('server shutdown during the handshake'), handshakeShutdownGraceMs);
    }
  }
}

interface ResolvedConfig {
  readonly provider: ExportProvider;
  readonly handshakeTimeoutMs: number;
  readonly maxConnections: number;
  readonly limits: HandshakeLimits;
  readonly transmission: TransmissionOptions;
  readonly log: (message: string) => void;
  readonly tls: ResolvedTls;
}

export class NbdServer {
  private readonly config: ResolvedConfig;
  private readonly live = new Set<Connection>();
  private listener: Server | undefined;
  private nextId = 1;
  private closing: Promise<void> | undefined;

  constructor(options: NbdServerOptions) {
    if (options === null || typeof options !== 'object' || typeof options.provider?.open !== 'function' || typeof options.provider?.list !== 'function') {
      throw new NbdServerError('EINVAL', 'NbdServer needs a provider with list() and open()');
    }
    const userLog = options.log;
    const log = userLog === undefined ? () => {} : (message: string) => {
      try {
        userLog(message);
      } catch {
        // a failing logger must not take a connection (or the process) down
      }
    };
    const maxPayloadBytes = positiveInteger('maxPayloadBytes', options.maxPayloadBytes, defaultMaxPayloadBytes, 65536, 0xffffffff - 8);
    this.config = {
      provider: options.provider,
      handshakeTimeoutMs: positiveInteger('handshakeTimeoutMs', options.handshakeTimeoutMs, defaultHandshakeTimeoutMs),
      maxConnections: positiveInteger('maxConnections', options.maxConnections, defaultMaxConnections),
      limits: {
        maxOptionsPerHandshake: positiveInteger('maxOptionsPerHandshake', options.maxOptionsPerHandshake, defaultMaxOptionsPerHandshake),
        maxOptionBytes: positiveInteger('maxOptionBytes', options.maxOptionBytes, defaultMaxOptionBytes, 4096 + 64),
        maxPayloadBytes,
      },
      transmission: {
        maxPayloadBytes,
        maxInflightRequests: positiveInteger('maxInflightRequestsPerConnection', options.maxInflightRequestsPerConnection, defaultMaxInflightRequestsPerConnection),
        log,
        onRequest: options.onRequest,
      },
      log,
      tls: resolveTls(options.tls),
    };
  }

  /** Open connections (handshaking or transmitting). */
  get connections(): number {
    return this.live.size;
  }

  /** @internal */
  get isClosing(): boolean {
    return this.closing !== undefined;
  }

  /** @internal */
  forget(connection: Connection): void {
    this.live.delete(connection);
  }

  async listen(target: ListenTarget): Promise<NbdAddress> {
    if (this.closing !== undefined) throw new NbdServerError('ECLOSED', 'the server is closed');
    if (this.listener !== undefined) throw new NbdServerError('EINVAL', 'the server is already listening');
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => this.accept(socket));
    server.on('error', (error) => this.config.log(`nbd listener error: ${error.message}`));
    this.listener = server;
    try {
      if ('socketPath' in target) {
        await removeStaleSocket(target.socketPath);
        await listenOn(server, (cb) => server.listen(target.socketPath, cb));
        if (target.socketMode !== undefined) await chmod(target.socketPath, target.socketMode);
        this.config.log(`nbd server listening on ${target.socketPath}`);
        return { socketPath: target.socketPath };
      }
      await listenOn(server, (cb) => server.listen(target.port, target.host, cb));
      const address = server.address();
      if (address === null || typeof address === 'string') throw new NbdServerError('EINVAL', 'unexpected listener address');
      this.config.log(`nbd server listening on ${address.address}:${address.port}`);
      return { host: address.address, port: address.port };
    } catch (error) {
      this.listener = undefined;
      server.close();
      if (error instanceof NbdServerError) throw error;
      const code = (error as { code?: unknown }).code;
      throw new NbdServerError(code === 'EADDRINUSE' ? 'EADDRINUSE' : 'EINVAL', `cannot listen: ${errorMessageOf(error)}`, { cause: error });
    }
  }

  /** Stops listening and disconnects every client cleanly once its requests in flight are answered. */
  close(): Promise<void> {
    if (this.closing === undefined) this.closing = this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    const listener = this.listener;
    const stopped = listener ? new Promise<void>((resolve) => listener.close(() => resolve())) : Promise.resolve();
    for (const connection of this.live) connection.shutdown();
    await Promise.all([stopped, ...Array.from(this.live, (c) => c.closed)]);
    this.config.log('nbd server closed');
  }

  private accept(socket: Socket): void {
    try {
      if (this.closing !== undefined || this.live.size >= this.config.maxConnections) {
        this.config.log(`nbd: refusing a connection (${this.closing ? 'server closing' : `${this.live.size} connections open`})`);
        socket.destroy();
        return;
      }
      const connection = new Connection(socket, this.nextId++, this, this.config);
      this.live.add(connection);
    } catch (error) {
      this.config.log(`nbd: accepting a connection failed: ${errorMessageOf(error)}`);
      socket.destroy();
    }
  }
}

function listenOn(server: Server, start: (callback: () => void) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error) => reject(error);
    server.once('error', onError);
    start(() => {
      server.off('error', onError);
      resolve();
    });
  });
}

/** A unix socket left by a dead server is removed; a live one, or any other file, is an error. */
async function removeStaleSocket(path: string): Promise<void> {
  let stats;
  try {
    stats = await lstat(path);
  } catch {
    return;
  }
  if (!stats.isSocket()) throw new NbdServerError('EADDRINUSE', `${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = createConnection(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new NbdServerError('EADDRINUSE', `another server is listening on ${path}`);
  await unlink(path);
}
