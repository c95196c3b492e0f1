/**
 * The fixed newstyle handshake as a state machine over a ByteQueue: no sockets here. The connection
 * feeds received bytes in; the machine sends replies through `send` and tells the connection what to
 * do next: keep reading, enter transmission with the negotiated state, or close.
 *
 * Spoken: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT,
 * SET_META_CONTEXT. Any other option gets NBD_REP_ERR_UNSUP and its data is skipped. Client
 * misbehaviour that leaves the stream untrustworthy (no fixed newstyle, unknown client flags, bad
 * option magic, an option too long to skip, too many options, an EXPORT_NAME that cannot be served)
 * closes the connection; everything else gets an error reply and the client may go on.
 *
 * TLS (doc/proto.md "TLS support", as nbdkit): with mode off (NOTLS) STARTTLS gets
 * NBD_REP_ERR_POLICY. With on (SELECTIVETLS where no export is TLS-only) and require (FORCEDTLS)
 * STARTTLS gets NBD_REP_ACK and the step 'starttls': the connection upgrades its socket and calls
 * tlsEstablished() before feeding more bytes, which from then on are the decrypted stream. The
 * client must wait for the ACK before starting TLS, so bytes queued behind STARTTLS break the
 * protocol: the connection is closed instead of acknowledged. Negotiation state (structured replies,
 * meta contexts) is forgotten at the upgrade, as the spec requires; a second STARTTLS gets
 * NBD_REP_ERR_INVALID. In require mode every option before TLS but STARTTLS and ABORT gets
 * NBD_REP_ERR_TLS_REQD (an oversized one too) and EXPORT_NAME closes the connection, so nothing
 * about the exports is told to a client that has not upgraded.
 */
import type { BlockDevice, ClientInfo, ExportProvider, ExtentContext } from '@cowstack/core';
import type { ByteQueue } from './byte-queue.js';
import { assert } from './errors.js';
import { errorMessageOf } from './errno-table.js';
import { maxDiscardedOptionBytes, extraOptionsPerListedExport, maxExportSizeBytes, maxMinimumBlockBytes, minPreferredBlockBytes } from './limits.js';
import { listMetaContexts, selectMetaContexts } from './meta-contexts.js';
import type { TlsMode } from './tls-config.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeString,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionError,
  encodeOptionReply,
  encodeServerPayload,
} from './option-codec.js';
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  clientFlagsBytes,
  optionHeaderBytes,
  optionName,
} from './protocol-constants.js';

export interface HandshakeLimits {
  readonly maxOptionsPerHandshake: number;
  readonly maxOptionBytes: number;
  readonly maxPayloadBytes: number;
}

/** A selected metadata context with the id sent to the client. */
export interface SelectedContext {
  readonly id: number;
  readonly name: ExtentContext;
}

/** Everything the transmission phase needs from the handshake. */
export interface Negotiated {
  readonly exportName: string;
  readonly device: BlockDevice;
  readonly structuredReplies: boolean;
  readonly metaContexts: readonly SelectedContext[];
  readonly transmissionFlags: number;
  /** The export was chosen over TLS. */
  readonly tls: boolean;
}

export type HandshakeStep =
  | { readonly kind: 'continue' }
  | { readonly kind: 'transmission'; readonly negotiated: Negotiated }
  /** STARTTLS was acknowledged: upgrade the socket, then call tlsEstablished() before consuming more. */
  | { readonly kind: 'starttls' }
  /** `soft`: the client asked (ABORT); otherwise the client broke the protocol or a limit. */
  | { readonly kind: 'close'; readonly soft: boolean; readonly reason: string };

/** Handshake flags this server sends. */
export const serverHandshakeFlags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/** Transmission flags for a device. DF is advertised only with structured replies, as the spec requires. */
export function transmissionFlagsFor(device: BlockDevice, structuredReplies: boolean): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
  if (device.readOnly) flags |= NBD_FLAG_READ_ONLY;
  else {
    flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    if (device.canFastZero) flags |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  if (device.canMultiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  return flags;
}

/** Block sizes advertised for a device: any byte offset works (the engine does read-modify-write). */
export function blockSizesFor(device: BlockDevice, maxPayloadBytes: number) {
  return { minimumBytes: 1, preferredBytes: Math.max(minPreferredBlockBytes, device.blockSizeBytes), maximumBytes: maxPayloadBytes };
}

/** Why a device cannot be exported as it is, or undefined when it can. */
function deviceDefect(device: BlockDevice, maxPayloadBytes: number): string | undefined {
  if (!Number.isSafeInteger(device.sizeBytes) || device.sizeBytes < 0 || device.sizeBytes > maxExportSizeBytes) return `size ${device.sizeBytes} is not a byte count below 2^53`;
  const block = device.blockSizeBytes;
  if (!Number.isInteger(block) || block < 1 || block > maxMinimumBlockBytes || (block & (block - 1)) !== 0) return `block size ${block} is not a power of two up to 65536`;
  if (Math.max(minPreferredBlockBytes, block) > maxPayloadBytes) return `block size ${block} exceeds the maximum payload ${maxPayloadBytes}`;
  return undefined;
}

type Phase =
  | { readonly name: 'flags' }
  | { readonly name: 'option-header' }
  | { readonly name: 'option-data'; readonly option: number; readonly length: number }
  | { readonly name: 'discard'; readonly option: number; left: number; readonly total: number }
  /** STARTTLS acknowledged; waiting for the connection's TLS handshake. */
  | { readonly name: 'tls' }
  | { readonly name: 'done' };

export class Handshake {
  private phase: Phase = { name: 'flags' };
  private clientFlags = 0;
  private optionsSeen = 0;
  private optionBudget: number;
  private listGrantedExtra = false;
  private structuredReplies = false;
  private metaExportName: string | undefined;
  private metaContexts: SelectedContext[] = [];
  private shuttingDown = false;
  /** STARTTLS was acknowledged: everything after it travels over TLS. */
  private usingTls = false;

  constructor(
    private readonly provider: ExportProvider,
    private readonly limits: HandshakeLimits,
    private readonly send: (bytes: Buffer) => void,
    private readonly log: (message: string) => void = () => {},
    private readonly tlsMode: TlsMode = 'off',
    /** Who the client is, passed to the provider (recorded with writes). */
    private readonly client?: ClientInfo,
  ) {
    this.optionBudget = limits.maxOptionsPerHandshake;
  }

  /** The connection finished the TLS handshake that the 'starttls' step asked for. */
  tlsEstablished(): void {
    assert(this.phase.name === 'tls', `tlsEstablished() in phase ${this.phase.name}`);
    this.phase = { name: 'option-header' };
  }

  /** Options other than STARTTLS and ABORT are refused until TLS is up (FORCEDTLS). */
  private get tlsRequired(): boolean {
    return this.tlsMode === 'require' && !this.usingTls;
  }

  /** The 18-byte greeting to send as soon as the client connects. */
  greeting(): Buffer {
    return encodeGreeting(serverHandshakeFlags);
  }

  /** From now on options (other than ABORT) get NBD_REP_ERR_SHUTDOWN, as the spec advises. */
  shutdown(): void {
    this.shuttingDown = true;
  }

  /** Consumes what it can from `queue`. After 'transmission' the queue holds transmission bytes. */
  consume(queue: ByteQueue): HandshakeStep {
    for (;;) {
      const phase = this.phase;
      switch (phase.name) {
        case 'done':
          assert(false, 'handshake consumed after it finished');
        // eslint-disable-next-line no-fallthrough
        case 'tls':
          assert(false, 'handshake consumed before the TLS upgrade finished');
        // eslint-disable-next-line no-fallthrough
        case 'flags': {
          if (queue.length < clientFlagsBytes) return { kind: 'continue' };
          this.clientFlags = queue.take(clientFlagsBytes).readUInt32BE(0);
          if (!(this.clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE)) {
            return this.close(false, `client flags 0x${this.clientFlags.toString(16)} lack FIXED_NEWSTYLE (oldstyle and plain newstyle clients are not served)`);
          }
          if (this.clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
            return this.close(false, `unknown client flags 0x${this.clientFlags.toString(16)}`);
          }
          this.phase = { name: 'option-header' };
          break;
        }
        case 'option-header': {
          if (queue.length < optionHeaderBytes) return { kind: 'continue' };
          const header = decodeOptionHeader(queue.take(optionHeaderBytes));
          if (!header.magicOk) return this.close(false, 'bad option magic');
          this.optionsSeen++;
          if (this.optionsSeen > this.optionBudget) return this.close(false, `more than ${this.optionBudget} options without choosing an export`);
          if (header.length > this.limits.maxOptionBytes) {
            const name = optionName(header.option);
            if (header.option === NBD_OPT_EXPORT_NAME) return this.close(false, `EXPORT_NAME of ${header.length} bytes`);
            if (header.length > Math.max(maxDiscardedOptionBytes, this.limits.maxOptionBytes)) return this.close(false, `option ${name} of ${header.length} bytes is too long to skip`);
            this.phase = { name: 'discard', option: header.option, left: header.length, total: header.length };
            break;
          }
          this.phase = { name: 'option-data', option: header.option, length: header.length };
          break;
        }
        case 'discard': {
          phase.left -= queue.skip(phase.left);
          if (phase.left > 0) return { kind: 'continue' };
          if (this.tlsRequired && phase.option !== NBD_OPT_STARTTLS && phase.option !== NBD_OPT_ABORT) this.reply(phase.option, NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
          else this.reply(phase.option, NBD_REP_ERR_TOO_BIG, `option data of ${phase.total} bytes exceeds the limit of ${this.limits.maxOptionBytes}`);
          this.phase = { name: 'option-header' };
          break;
        }
        case 'option-data': {
          if (queue.length < phase.length) return { kind: 'continue' };
          const data = queue.take(phase.length);
          this.phase = { name: 'option-header' };
          const step = this.handleOption(phase.option, data, queue.length);
          if (step.kind === 'starttls') {
            this.phase = { name: 'tls' };
            return step;
          }
          if (step.kind !== 'continue') {
            this.phase = { name: 'done' };
            return step;
          }
          break;
        }
      }
    }
  }

  private close(soft: boolean, reason: string): HandshakeStep {
    this.phase = { name: 'done' };
    return { kind: 'close', soft, reason };
  }

  private reply(option: number, type: number, message?: string, payload?: Buffer): void {
    this.send(message !== undefined ? encodeOptionError(option, type, message) : encodeOptionReply(option, type, payload));
  }

  /** `queuedBytes`: what the client sent after this option (and before any reply to it). */
  private handleOption(option: number, data: Buffer, queuedBytes: number): HandshakeStep {
    if (option === NBD_OPT_ABORT) {
      this.reply(option, NBD_REP_ACK);
      return { kind: 'close', soft: true, reason: 'client sent NBD_OPT_ABORT' };
    }
    if (this.shuttingDown) {
      if (option === NBD_OPT_EXPORT_NAME) return { kind: 'close', soft: false, reason: 'EXPORT_NAME while the server shuts down' };
      this.reply(option, NBD_REP_ERR_SHUTDOWN, 'the server is shutting down');
      return { kind: 'continue' };
    }
    if (this.tlsRequired && option !== NBD_OPT_STARTTLS) {
      // EXPORT_NAME cannot be answered with an error: the spec says terminate the session.
      if (option === NBD_OPT_EXPORT_NAME) return { kind: 'close', soft: false, reason: 'EXPORT_NAME before STARTTLS, and this server requires TLS' };
      this.reply(option, NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      return { kind: 'continue' };
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME:
        return this.exportName(data);
      case NBD_OPT_LIST:
        return this.list(data);
      case NBD_OPT_STARTTLS:
        return this.startTls(data, queuedBytes);
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return this.infoOrGo(option, data);
      case NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) this.reply(option, NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        else if (this.structuredReplies) this.reply(option, NBD_REP_ERR_INVALID, 'structured replies are already negotiated');
        else {
          this.structuredReplies = true;
          this.reply(option, NBD_REP_ACK);
        }
        return { kind: 'continue' };
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        this.reply(option, NBD_REP_ERR_UNSUP, `option ${optionName(option)} is not supported`);
        return { kind: 'continue' };
    }
  }

  private startTls(data: Buffer, queuedBytes: number): HandshakeStep {
    if (data.length !== 0) this.reply(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, 'STARTTLS takes no data');
    else if (this.tlsMode === 'off') this.reply(NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY, 'TLS is not enabled on this server');
    else if (this.usingTls) this.reply(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, 'TLS is already in use on this connection');
    else if (queuedBytes > 0) {
      // The client must wait for the ACK before its TLS handshake; these bytes would be taken for it.
      return { kind: 'close', soft: false, reason: `client sent ${queuedBytes} bytes after NBD_OPT_STARTTLS without waiting for the reply` };
    } else {
      this.reply(NBD_OPT_STARTTLS, NBD_REP_ACK);
      this.usingTls = true;
      // The spec: no negotiation state survives the upgrade.
      this.structuredReplies = false;
      this.metaContexts = [];
      this.metaExportName = undefined;
      return { kind: 'starttls' };
    }
    return { kind: 'continue' };
  }

  /** provider.open with its failures turned into a message. */
  private open(name: string): { device: BlockDevice } | { error: string } {
    assert(!this.tlsRequired, 'an export is opened before TLS in require mode');
    let device: BlockDevice | undefined;
    try {
      device = this.provider.open(name, this.client);
    } catch (error) {
      this.log(`opening export '${name}' failed: ${errorMessageOf(error)}`);
      return { error: `export '${name}' cannot be opened: ${errorMessageOf(error)}` };
    }
    if (device === undefined) return { error: name === '' ? 'there is no default export' : `export '${name}' does not exist` };
    const defect = deviceDefect(device, this.limits.maxPayloadBytes);
    if (defect !== undefined) {
      this.log(`export '${name}' cannot be served: ${defect}`);
      return { error: `export '${name}' is misconfigured: ${defect}` };
    }
    return { device };
  }

  private negotiated(name: string, device: BlockDevice): Negotiated {
    assert(!this.tlsRequired, 'an export is described or served before TLS in require mode');
    // The spec: contexts count only if the last SET_META_CONTEXT named the export finally chosen.
    const metaContexts =
      this.metaExportName === name ? this.metaContexts.filter((c) => device.extentContexts.includes(c.name) || device.acceptsContext?.(c.name) === true) : [];
    return { exportName: name, device, structuredReplies: this.structuredReplies, metaContexts, transmissionFlags: transmissionFlagsFor(device, this.structuredReplies), tls: this.usingTls };
  }

  private exportName(data: Buffer): HandshakeStep {
    const name = decodeString(data);
    if (name === undefined) return { kind: 'close', soft: false, reason: 'EXPORT_NAME with an invalid name' };
    const opened = this.open(name);
    // EXPORT_NAME cannot be answered with an error: the spec says terminate the session.
    if ('error' in opened) return { kind: 'close', soft: false, reason: `EXPORT_NAME: ${opened.error}` };
    const negotiated = this.negotiated(name, opened.device);
    this.send(encodeExportNameReply(opened.device.sizeBytes, negotiated.transmissionFlags, (this.clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0));
    return { kind: 'transmission', negotiated };
  }

  private list(data: Buffer): HandshakeStep {
    assert(!this.tlsRequired, 'exports are listed before TLS in require mode');
    if (data.length !== 0) {
      this.reply(NBD_OPT_LIST, NBD_REP_ERR_INVALID, 'LIST takes no data');
      return { kind: 'continue' };
    }
    let exports;
    try {
      exports = this.provider.list();
    } catch (error) {
      this.log(`listing exports failed: ${errorMessageOf(error)}`);
      this.reply(NBD_OPT_LIST, NBD_REP_ERR_PLATFORM, `listing exports failed: ${errorMessageOf(error)}`);
      return { kind: 'continue' };
    }
    if (!this.listGrantedExtra) {
      this.listGrantedExtra = true;
      this.optionBudget += extraOptionsPerListedExport * exports.length;
    }
    const replies = exports.map((e) => encodeOptionReply(NBD_OPT_LIST, NBD_REP_SERVER, encodeServerPayload(e.name, e.description)));
    replies.push(encodeOptionReply(NBD_OPT_LIST, NBD_REP_ACK));
    this.send(Buffer.concat(replies));
    return { kind: 'continue' };
  }

  private describe(name: string): string | undefined {
    try {
      return this.provider.list().find((e) => e.name === name)?.description;
    } catch {
      return undefined;
    }
  }

  private infoOrGo(option: number, data: Buffer): HandshakeStep {
    const decoded = decodeInfoRequest(data);
    if (!decoded.ok) {
      this.reply(option, NBD_REP_ERR_INVALID, decoded.reason);
      return { kind: 'continue' };
    }
    const { name, infos } = decoded.value;
    const opened = this.open(name);
    if ('error' in opened) {
      this.reply(option, NBD_REP_ERR_UNKNOWN, opened.error);
      return { kind: 'continue' };
    }
    const { device } = opened;
    const negotiated = this.negotiated(name, device);
    // NBD_INFO_EXPORT is always sent (mandatory); the others only when asked, each once.
    const replies = [encodeOptionReply(option, NBD_REP_INFO, encodeInfoExport(device.sizeBytes, negotiated.transmissionFlags))];
    for (const info of new Set(infos)) {
      if (info === NBD_INFO_NAME) replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, name)));
      else if (info === NBD_INFO_DESCRIPTION) {
        const description = this.describe(name);
        if (description) replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, description)));
      } else if (info === NBD_INFO_BLOCK_SIZE) {
        replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfoBlockSize(blockSizesFor(device, this.limits.maxPayloadBytes))));
      } else if (info !== NBD_INFO_EXPORT) {
        // unknown information requests are ignored, as the spec requires
      }
    }
    replies.push(encodeOptionReply(option, NBD_REP_ACK));
    this.send(Buffer.concat(replies));
    return option === NBD_OPT_GO ? { kind: 'transmission', negotiated } : { kind: 'continue' };
  }

  private metaContext(option: number, data: Buffer): HandshakeStep {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set) {
      // SET replaces the selection even when it fails.
      this.metaContexts = [];
      this.metaExportName = undefined;
      if (!this.structuredReplies) {
        this.reply(option, NBD_REP_ERR_INVALID, 'SET_META_CONTEXT needs structured replies first');
        return { kind: 'continue' };
      }
    }
    const decoded = decodeMetaContextRequest(data);
    if (!decoded.ok) {
      this.reply(option, NBD_REP_ERR_INVALID, decoded.reason);
      return { kind: 'continue' };
    }
    const { name, queries } = decoded.value;
    const opened = this.open(name);
    if ('error' in opened) {
      this.reply(option, NBD_REP_ERR_UNKNOWN, opened.error);
      return { kind: 'continue' };
    }
    const device = opened.device;
    const available = device.extentContexts;
    const accepts = device.acceptsContext === undefined ? undefined : (context: string): boolean => device.acceptsContext!(context);
    const contexts = set ? selectMetaContexts(available, queries, accepts) : listMetaContexts(available, queries, accepts);
    // Ids are numbered per connection, in the canonical order of the selection.
    const replies = contexts.map((c, i) => encodeOptionReply(option, NBD_REP_META_CONTEXT, encodeMetaContext(set ? i + 1 : 0, c)));
    replies.push(encodeOptionReply(option, NBD_REP_ACK));
    if (set) {
      this.metaExportName = name;
      this.metaContexts = contexts.map((c, i) => ({ id: i + 1, name: c }));
    }
    this.send(Buffer.concat(replies));
    return { kind: 'continue' };
  }
}
