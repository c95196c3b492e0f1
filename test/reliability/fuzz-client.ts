/**
 * Sends one fuzz session over a fresh connection and records what came back and how the connection
 * ended. The client writes the whole session (in one write, or in pieces on separate turns of the event
 * loop), then half-closes (FIN) so that a session ending inside a frame is not a silent wait: the server
 * must then answer what it parsed and close. A session with `ending: 'reset'` writes part of its bytes
 * and destroys the socket instead (the server must shrug that off).
 *
 * Hang: no byte and no close from the server for `idleTimeoutMs` after the client finished sending.
 */
import { createConnection, type Socket } from 'node:net';
import type { CloseKind } from './fuzz-oracle.js';
import type { FuzzSession } from './fuzz-frames.js';

export interface FuzzEndpoint {
  readonly socketPath: string;
  readonly tcp: { readonly host: string; readonly port: number } | undefined;
}

export interface SessionResult {
  /** What the client really sent (up to the reset, or everything). */
  readonly sent: Buffer;
  readonly received: Buffer;
  readonly close: CloseKind | 'client-reset' | 'connect-failed';
  readonly error: string | undefined;
  readonly durationMs: number;
  /** From the client's FIN to the close (undefined when the client did not send one). */
  readonly closedAfterClientEndMs: number | undefined;
}

export interface ClientLimits {
  /** Silence (no byte, no close) this long after the client's FIN is a hang. */
  readonly idleTimeoutMs: number;
  /** A connection still open after this long is a hang even if bytes trickle. */
  readonly maxSessionMs: number;
}

export function runSession(session: FuzzSession, endpoint: FuzzEndpoint, limits: ClientLimits): Promise<SessionResult> {
  const started = performance.now();
  return new Promise((resolve) => {
    const useTcp = session.transport === 'tcp' && endpoint.tcp !== undefined;
    const socket: Socket = useTcp ? createConnection({ host: endpoint.tcp!.host, port: endpoint.tcp!.port }) : createConnection({ path: endpoint.socketPath });
    const chunks: Buffer[] = [];
    let sentBytes = session.stream.length;
    let gotFin = false;
    let reset = false;
    let connected = false;
    let clientReset = false;
    let error: string | undefined;
    let finished = false;
    let idleTimer: NodeJS.Timeout | undefined;
    let sentAll = false;
    let endedAt: number | undefined;
    const overall = setTimeout(() => done('open'), limits.maxSessionMs);

    const done = (close: SessionResult['close']): void => {
      if (finished) return;
      finished = true;
      clearTimeout(overall);
      clearTimeout(idleTimer);
      if (!socket.destroyed) socket.destroy();
      const now = performance.now();
      resolve({ sent: session.stream.subarray(0, sentBytes), received: Buffer.concat(chunks), close, error, durationMs: now - started, closedAfterClientEndMs: endedAt === undefined ? undefined : now - endedAt });
    };
    const armIdle = (): void => {
      if (!sentAll || finished) return;
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => done('open'), limits.idleTimeoutMs);
    };

    socket.on('data', (d: Buffer) => {
      chunks.push(d);
      armIdle();
    });
    socket.on('end', () => {
      gotFin = true;
    });
    socket.on('error', (e: NodeJS.ErrnoException) => {
      if (!connected) {
        error = `${e.code ?? ''} ${e.message}`;
        done('connect-failed');
        return;
      }
      // a write after the server closed: EPIPE once its FIN came, a reset otherwise
      if (e.code === 'ECONNRESET' || e.code === 'EPIPE') {
        if (!gotFin) reset = true;
      } else error = `${e.code ?? ''} ${e.message}`;
    });
    socket.on('close', () => {
      if (clientReset) done('client-reset');
      else if (!connected) done('connect-failed');
      else done(reset && !gotFin ? 'reset' : gotFin ? 'fin' : 'reset');
    });
    socket.once('connect', () => {
      connected = true;
      const stream = session.stream;
      if (session.ending === 'reset') {
        sentBytes = session.resetAfter;
        socket.write(stream.subarray(0, session.resetAfter), () => {
          clientReset = true;
          if (useTcp) socket.resetAndDestroy();
          else socket.destroy();
        });
        return;
      }
      const pieces = Math.max(1, Math.min(session.pieces, stream.length));
      let at = 0;
      let piece = 0;
      const writeNext = (): void => {
        if (finished) return;
        if (socket.destroyed || socket.writableEnded) {
          sentAll = true;
          armIdle();
          return;
        }
        piece++;
        const to = piece === pieces ? stream.length : Math.floor((stream.length * piece) / pieces);
        if (to > at) socket.write(stream.subarray(at, to));
        at = to;
        if (piece < pieces) setImmediate(writeNext);
        else {
          socket.end();
          endedAt = performance.now();
          sentAll = true;
          armIdle();
        }
      };
      writeNext();
    });
  });
}
