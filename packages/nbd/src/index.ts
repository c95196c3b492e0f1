/**
 * @cowstack/nbd: a spec-correct NBD server (fixed newstyle, structured replies, metadata contexts)
 * for any ExportProvider. The server and its options are the API; the codecs are exported for tests
 * and tools that speak NBD.
 */
export { NbdServer } from './server.js';
export type { ListenTarget, NbdAddress, NbdServerOptions } from './server.js';
export { NbdServerError } from './errors.js';
export { parsePskFile, x509CredentialsFromDir } from './tls-config.js';
export type { PskCredentials, TlsCredentials, TlsMode, TlsOptions, X509Credentials } from './tls-config.js';
export type { NbdServerErrorCode } from './errors.js';
export { errnoTable, nbdErrnoFor } from './errno-table.js';
export { transmissionFlagsFor, blockSizesFor, serverHandshakeFlags } from './handshake.js';
export * as limits from './limits.js';
export * as protocol from './protocol-constants.js';
export * as optionCodec from './option-codec.js';
export * as requestCodec from './request-codec.js';
export * as replyCodec from './reply-codec.js';
