/**
 * Named limits of the NBD server, units last. The `default*` values are what NbdServerOptions falls
 * back to; the others are fixed protocol or safety bounds. Each limit is checked where a client could
 * exceed it (the wire) and asserted where the server relies on it.
 */

/** A client must finish option haggling within this time or is disconnected. */
export const defaultHandshakeTimeoutMs = 10_000;
/** Options a client may send before it must have chosen an export (nbdkit allows 32). */
export const defaultMaxOptionsPerHandshake = 32;
/**
 * Extra options granted per export after the client's first NBD_OPT_LIST, so a client can ask
 * NBD_OPT_INFO and metadata contexts of every listed export (nbdinfo --list does).
 */
export const extraOptionsPerListedExport = 4;
/** Largest option payload the server reads and parses. */
export const defaultMaxOptionBytes = 64 * 1024;
/**
 * An option payload above maxOptionBytes but at most this long is read and thrown away (the client
 * gets NBD_REP_ERR_TOO_BIG); a longer one ends the connection.
 */
export const maxDiscardedOptionBytes = 1024 * 1024;
/** Largest READ or WRITE payload; advertised as the maximum in NBD_INFO_BLOCK_SIZE. */
export const defaultMaxPayloadBytes = 32 * 1024 * 1024;
/** The spec's floor for maximum payloads that must not be treated as a denial of service (2^25). */
export const specPayloadFloorBytes = 32 * 1024 * 1024;
/**
 * A WRITE whose payload is above maxPayloadBytes is read and thrown away (the client gets EINVAL) when
 * at most max(2 × maxPayloadBytes, specPayloadFloorBytes) long; a longer one ends the connection
 * because the server will not buffer or skip that much on behalf of a misbehaving client.
 */
export function maxDiscardedPayloadBytes(maxPayloadBytes: number): number {
  return Math.max(2 * maxPayloadBytes, specPayloadFloorBytes);
}
/** Requests of one connection being served at once; reading pauses at this many. */
export const defaultMaxInflightRequestsPerConnection = 64;
/** Concurrent client connections; further connections are closed at once. */
export const defaultMaxConnections = 256;
/** Reading pauses while more than this many reply bytes wait in the socket's write queue. */
export const maxQueuedReplyBytes = 64 * 1024 * 1024;
/** Most descriptors sent in one NBD_REPLY_TYPE_BLOCK_STATUS chunk (the spec's SHOULD NOT exceed). */
export const maxBlockStatusDescriptors = 1 << 20;
/** Largest descriptor or hole length: 32 bits on the wire. */
export const maxUint32 = 0xffffffff;
/** Largest export size the server will advertise: offsets are exact JavaScript numbers below 2^53. */
export const maxExportSizeBytes = Number.MAX_SAFE_INTEGER;
/** After close(), connections still busy after this long are destroyed. */
export const shutdownTimeoutMs = 30_000;
/** Smallest preferred block size the spec allows (2^9). */
export const minPreferredBlockBytes = 512;
/** Largest minimum block size the spec allows (2^16). */
export const maxMinimumBlockBytes = 65536;
/** Longest pre-shared key accepted from a PSK file (psktool makes 32-byte keys). */
export const maxPskBytes = 256;
/** Longest PSK username (identity); OpenSSL's limit is 128. */
export const maxPskIdentityBytes = 128;
/** Largest PSK file read. */
export const maxPskFileBytes = 1024 * 1024;
