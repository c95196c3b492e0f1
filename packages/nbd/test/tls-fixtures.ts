/**
 * TLS credentials for tests, made with the openssl command in a temporary directory:
 *
 * - `server/`: ca-cert.pem, server-cert.pem (CN and SAN localhost, 127.0.0.1), server-key.pem: the
 *   qemu/nbdkit certificate directory the server is given.
 * - `client/`: ca-cert.pem, client-cert.pem, client-key.pem signed by the same CA: the directory
 *   libnbd (tls-certificates=) and qemu (tls-creds-x509 dir=) read on the client side.
 * - `rogue/`: the same layout, but the client certificate comes from another CA.
 * - `psk/keys.psk` (alice and bob), `wrong-psk/keys.psk` (alice with another key), in psktool format;
 *   qemu's tls-creds-psk reads `keys.psk` from its dir.
 *
 * Made once per test process (RSA key generation takes a moment).
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { tempDir } from './helpers.js';

export interface TlsFixtures {
  readonly serverDir: string;
  readonly clientDir: string;
  readonly rogueClientDir: string;
  readonly pskDir: string;
  readonly pskFile: string;
  readonly wrongPskDir: string;
  readonly wrongPskFile: string;
  readonly keys: { readonly alice: string; readonly bob: string };
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function makeCa(dir: string, name: string): void {
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}-cert.pem`, '-days', '2', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
}

function makeLeaf(dir: string, ca: string, name: string, cn: string, extensions: string): void {
  writeFileSync(join(dir, `${name}.ext`), extensions);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`], dir);
  openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}-cert.pem`, '-CAkey', `${ca}-key.pem`, '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`], dir);
}

let made: TlsFixtures | undefined;

export function tlsFixtures(): TlsFixtures {
  if (made !== undefined) return made;
  const root = tempDir('tls');
  const work = join(root, 'work');
  mkdirSync(work);
  makeCa(work, 'ca');
  makeCa(work, 'rogue-ca');
  makeLeaf(work, 'ca', 'server', 'localhost', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n');
  const clientExt = 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n';
  makeLeaf(work, 'ca', 'client', 'test client', clientExt);
  makeLeaf(work, 'rogue-ca', 'rogue', 'rogue client', clientExt);
  const place = (dir: string, files: Record<string, string>): string => {
    const at = join(root, dir);
    mkdirSync(at);
    for (const [to, from] of Object.entries(files)) copyFileSync(join(work, from), join(at, to));
    return at;
  };
  const serverDir = place('server', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' });
  const clientDir = place('client', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'client-cert.pem', 'client-key.pem': 'client-key.pem' });
  const rogueClientDir = place('rogue', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'rogue-cert.pem', 'client-key.pem': 'rogue-key.pem' });
  const keys = { alice: randomBytes(32).toString('hex'), bob: randomBytes(32).toString('hex') };
  const pskDir = join(root, 'psk');
  mkdirSync(pskDir);
  const pskFile = join(pskDir, 'keys.psk');
  writeFileSync(pskFile, `alice:${keys.alice}\nbob:${keys.bob}\n`, { mode: 0o600 });
  const wrongPskDir = join(root, 'wrong-psk');
  mkdirSync(wrongPskDir);
  const wrongPskFile = join(wrongPskDir, 'keys.psk');
  writeFileSync(wrongPskFile, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
  made = { serverDir, clientDir, rogueClientDir, pskDir, pskFile, wrongPskDir, wrongPskFile, keys };
  return made;
}
