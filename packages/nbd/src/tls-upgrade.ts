/**
 * The server side of one STARTTLS: wraps a connected plain socket in TLS and reports either the
 * secure socket or why the TLS handshake failed (bad PSK, unknown username, client certificate
 * refused, client gone, timeout).
 *
 * It goes through a tls.Server that never listens, handed the socket with emit('connection'): that
 * is the path on which node:tls checks a client certificate against the CA (rejectUnauthorized) and
 * reports handshake failures ('tlsClientError'); a bare TLSSocket does neither. One such server per
 * upgrade keeps the outcome tied to its connection; it costs a secure context built from the
 * already loaded credentials (about a millisecond, beside the handshake's own public-key work).
 *
 * Pending writes on the plain socket (the ACK to STARTTLS) go out before the first TLS record, and
 * the caller must have stopped reading the plain socket itself: from here on, its bytes are TLS.
 */
import type { Socket } from 'node:net';
import { Server as TlsServer, type TLSSocket } from 'node:tls';
import { errorMessageOf } from './errno-table.js';
import type { ResolvedTls } from './tls-config.js';

export interface TlsUpgradeHandlers {
  /** The TLS handshake succeeded; `session` describes it for the log. */
  secure(socket: TLSSocket, session: string): void;
  /** The TLS handshake failed; the connection must be closed. */
  failed(reason: string): void;
}

export function upgradeToTls(raw: Socket, options: NonNullable<ResolvedTls['serverOptions']>, handshakeTimeoutMs: number, handlers: TlsUpgradeHandlers): void {
  const halfOpen = raw.allowHalfOpen;
  let identity: string | undefined;
  let unknownIdentity = false;
  const basePsk = options.pskCallback;
  const server = new TlsServer({
    ...options,
    handshakeTimeout: handshakeTimeoutMs,
    ...(basePsk !== undefined
      ? {
          pskCallback: (socket: TLSSocket, id: string) => {
            identity = id;
            const key = basePsk(socket, id);
            unknownIdentity = key === null;
            return key;
          },
        }
      : {}),
  });
  let settled = false;
  server.once('secureConnection', (socket: TLSSocket) => {
    settled = true;
    socket.allowHalfOpen = halfOpen;
    const parts = [socket.getProtocol() ?? 'TLS', socket.getCipher()?.name ?? 'unknown cipher'];
    if (identity !== undefined) parts.push(`PSK username '${identity}'`);
    else if (options.requestCert) {
      const subject = socket.getPeerCertificate()?.subject;
      parts.push(`client certificate ${subject?.CN !== undefined ? `CN=${subject.CN}` : 'verified'}`);
    }
    handlers.secure(socket, parts.join(', '));
  });
  server.once('tlsClientError', (error: Error, socket: TLSSocket) => {
    if (settled) return;
    settled = true;
    // OpenSSL errors carry a short `reason` ("binder does not verify"); the message is multi-line.
    const short = (error as { reason?: unknown }).reason;
    let reason = typeof short === 'string' && short !== '' ? short : errorMessageOf(error).trim().split('\n')[0];
    if ((error as { code?: unknown }).code === 'ECONNRESET') reason = 'the client closed the connection';
    if (unknownIdentity) reason = `unknown PSK username '${identity}'`;
    else if (identity !== undefined) reason = `PSK username '${identity}': ${reason}${reason === 'binder does not verify' ? ' (wrong key)' : ''}`;
    else if (socket.authorizationError) reason = `client certificate refused: ${String(socket.authorizationError)}`;
    else if (options.requestCert && /peer did not return a certificate/.test(reason)) reason = 'no client certificate (one signed by the CA is required)';
    handlers.failed(reason);
  });
  // The TLS socket copies allowHalfOpen from the plain one. Until the handshake is done it must be
  // false: a client that gives up (its own credentials failed) only closes its side, and with
  // half-open allowed nothing would notice until the handshake timeout. Restored once secure.
  raw.allowHalfOpen = false;
  try {
    server.emit('connection', raw);
  } finally {
    raw.allowHalfOpen = halfOpen;
  }
}
