/**
 * TLS configuration of the server: the public option types, the checks that turn them into
 * node:tls server options once (at construction, so a missing file or a bad key fails the server's
 * start, not a client's handshake), and the two credential conventions of nbdkit and qemu:
 *
 * - x509: a certificate directory holding ca-cert.pem, server-cert.pem, server-key.pem and optionally
 *   ca-crl.pem. The client certificate is asked for and checked against the CA only with verifyPeer
 *   (nbdkit --tls-verify-peer).
 * - PSK: a GnuTLS psktool file, one `username:hexkey` line per client. The client's identity is its
 *   username.
 *
 * TLS 1.2 is the floor (the spec's MUST); TLS 1.3 is preferred. PSK suites are added to the cipher
 * list only in PSK mode (OpenSSL disables them by default). Reading the files is the only I/O here.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSecureContext, type TlsOptions as NodeTlsOptions } from 'node:tls';
import { errorMessageOf } from './errno-table.js';
import { NbdServerError } from './errors.js';
import { maxPskBytes, maxPskFileBytes, maxPskIdentityBytes } from './limits.js';

/**
 * off: NOTLS (STARTTLS gets NBD_REP_ERR_POLICY). on: STARTTLS allowed, plaintext allowed too.
 * require: FORCEDTLS, nothing but STARTTLS and ABORT before TLS.
 */
export type TlsMode = 'off' | 'on' | 'require';

/** PEM text or bytes, or a file to read it from. File and inline forms of one item are exclusive. */
export interface X509Credentials {
  readonly kind: 'x509';
  readonly certFile?: string;
  readonly keyFile?: string;
  /** CA certificates that sign client certificates; needed for verifyPeer. */
  readonly caFile?: string;
  /** Certificate revocation list checked with verifyPeer (nbdkit: ca-crl.pem). */
  readonly crlFile?: string;
  readonly cert?: string | Buffer;
  readonly key?: string | Buffer;
  readonly ca?: string | Buffer;
  readonly crl?: string | Buffer;
  /** Ask for a client certificate and refuse clients whose certificate the CA did not sign. */
  readonly verifyPeer?: boolean;
}

export interface PskCredentials {
  readonly kind: 'psk';
  /** psktool format: `username:hexkey` per line. */
  readonly pskFile: string;
}

export type TlsCredentials = X509Credentials | PskCredentials;

export type TlsOptions = { readonly mode: 'off' } | { readonly mode: 'on' | 'require'; readonly credentials: TlsCredentials };

/** What the connections need: the mode, and (unless off) the options for each STARTTLS. */
export interface ResolvedTls {
  readonly mode: TlsMode;
  /** Options for the per-connection tls.Server; undefined when mode is off. */
  readonly serverOptions: NodeTlsOptions & { requestCert?: boolean; rejectUnauthorized?: boolean } | undefined;
  /** For the log: "x509" or "x509, client certificates verified" or "PSK, 2 users". */
  readonly summary: string;
}

/** The three (four) files of a qemu/nbdkit TLS certificate directory. */
export function x509CredentialsFromDir(dir: string, options: { verifyPeer?: boolean } = {}): X509Credentials {
  const crlFile = join(dir, 'ca-crl.pem');
  return {
    kind: 'x509',
    certFile: join(dir, 'server-cert.pem'),
    keyFile: join(dir, 'server-key.pem'),
    caFile: join(dir, 'ca-cert.pem'),
    ...(existsSync(crlFile) ? { crlFile } : {}),
    verifyPeer: options.verifyPeer === true,
  };
}

/**
 * Parses a psktool file: `username:hexkey` lines (blank lines ignored). Throws NbdServerError EINVAL
 * naming the line of a malformed entry (never its key), a duplicate username, or an empty file.
 */
export function parsePskFile(text: string, source = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === '') continue;
    const where = `${source} line ${i + 1}`;
    const colon = line.lastIndexOf(':');
    if (colon <= 0) throw new NbdServerError('EINVAL', `${where} is not username:hexkey`);
    const username = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (username.includes(':') || Buffer.byteLength(username, 'utf8') > maxPskIdentityBytes) {
      throw new NbdServerError('EINVAL', `${where}: the username must have no ':' and at most ${maxPskIdentityBytes} bytes`);
    }
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new NbdServerError('EINVAL', `${where}: the key is not an even number of hex digits`);
    if (hex.length / 2 > maxPskBytes) throw new NbdServerError('EINVAL', `${where}: the key is longer than ${maxPskBytes} bytes`);
    if (keys.has(username)) throw new NbdServerError('EINVAL', `${where}: username '${username}' appears twice`);
    keys.set(username, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new NbdServerError('EINVAL', `${source} has no username:hexkey line`);
  return keys;
}

function readCredential(what: string, file: string | undefined, inline: string | Buffer | undefined, maxBytes = Infinity): string | Buffer | undefined {
  if (file !== undefined && inline !== undefined) throw new NbdServerError('EINVAL', `tls: give ${what} as a file or inline, not both`);
  if (inline !== undefined) return inline;
  if (file === undefined) return undefined;
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (error) {
    throw new NbdServerError('EINVAL', `tls: cannot read the ${what} ${file}: ${errorMessageOf(error)}`, { cause: error });
  }
  if (bytes.length > maxBytes) throw new NbdServerError('EINVAL', `tls: the ${what} ${file} is larger than ${maxBytes} bytes`);
  return bytes;
}

function resolveX509(credentials: X509Credentials): ResolvedTls {
  const cert = readCredential('certificate', credentials.certFile, credentials.cert);
  const key = readCredential('private key', credentials.keyFile, credentials.key);
  const ca = readCredential('CA certificate', credentials.caFile, credentials.ca);
  const crl = readCredential('CA revocation list', credentials.crlFile, credentials.crl);
  if (cert === undefined || key === undefined) throw new NbdServerError('EINVAL', 'tls: x509 credentials need a certificate and a private key');
  const verifyPeer = credentials.verifyPeer === true;
  if (verifyPeer && ca === undefined) throw new NbdServerError('EINVAL', 'tls: verifyPeer needs the CA certificate that signs client certificates');
  const serverOptions = {
    cert,
    key,
    ...(verifyPeer ? { ca, ...(crl !== undefined ? { crl } : {}) } : {}),
    minVersion: 'TLSv1.2' as const,
    honorCipherOrder: true,
    requestCert: verifyPeer,
    rejectUnauthorized: verifyPeer,
  };
  checkContext(serverOptions);
  return { mode: 'on', serverOptions, summary: verifyPeer ? 'x509, client certificates verified' : 'x509' };
}

const pskCiphersTls12 = [
  // TLS 1.3 first. A PSK from the legacy callback is bound to SHA-256, so AES-128-GCM is the
  // fastest usable suite on CPUs with AES instructions; listed before ChaCha20 and honoured.
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
].join(':');

function resolvePsk(credentials: PskCredentials): ResolvedTls {
  if (typeof credentials.pskFile !== 'string' || credentials.pskFile === '') throw new NbdServerError('EINVAL', 'tls: psk credentials need pskFile');
  const text = readCredential('PSK file', credentials.pskFile, undefined, maxPskFileBytes) as Buffer;
  const keys = parsePskFile(text.toString('utf8'), credentials.pskFile);
  const serverOptions = {
    minVersion: 'TLSv1.2' as const,
    honorCipherOrder: true,
    // TLS 1.3 suites are configured apart (the defaults all work with a PSK); this is the TLS 1.2
    // list, which without a certificate can only be PSK suites: forward-secret ones first, as in
    // GnuTLS's NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK. (Node's default list ends in !PSK.)
    ciphers: pskCiphersTls12,
    pskCallback: (_socket: unknown, identity: string): Buffer | null => keys.get(identity) ?? null,
  };
  checkContext(serverOptions);
  return { mode: 'on', serverOptions, summary: `PSK, ${keys.size} user${keys.size === 1 ? '' : 's'}` };
}

/** Builds a context once so that a bad key, certificate or cipher list fails here with EINVAL. */
function checkContext(options: NodeTlsOptions): void {
  try {
    createSecureContext(options);
  } catch (error) {
    throw new NbdServerError('EINVAL', `tls: the credentials cannot be used: ${errorMessageOf(error)}`, { cause: error });
  }
}

/** Validates TlsOptions and loads the credentials. */
export function resolveTls(options: TlsOptions | undefined): ResolvedTls {
  if (options === undefined) return { mode: 'off', serverOptions: undefined, summary: 'off' };
  if (options === null || typeof options !== 'object') throw new NbdServerError('EINVAL', 'tls must be an object');
  const mode = options.mode;
  if (mode === 'off') return { mode: 'off', serverOptions: undefined, summary: 'off' };
  if (mode !== 'on' && mode !== 'require') throw new NbdServerError('EINVAL', `tls.mode must be 'off', 'on' or 'require', got ${String(mode)}`);
  const credentials = options.credentials;
  if (credentials === null || typeof credentials !== 'object') throw new NbdServerError('EINVAL', `tls.mode '${mode}' needs credentials (x509 or psk)`);
  let resolved: ResolvedTls;
  if (credentials.kind === 'x509') resolved = resolveX509(credentials);
  else if (credentials.kind === 'psk') resolved = resolvePsk(credentials);
  else throw new NbdServerError('EINVAL', `tls.credentials.kind must be 'x509' or 'psk'`);
  return { ...resolved, mode };
}
