/**
 * LevelDB table verification. Before LevelDB opens a journal, every table file the database uses
 * (the ones its MANIFEST names) is checked block by block against the CRC32C that LevelDB keeps
 * beside each block.
 *
 * Why: the LevelDB inside classic-level reads table blocks without checking them (no
 * `paranoid_checks` or `verify_checksums` can be set through it), and some damaged blocks make it
 * fail a C++ assertion (`ExtractUserKey: internal_key.size() >= 8`), which aborts the whole process.
 * A flipped byte in a .ldb file would then kill check, recover and serve instead of being named.
 * Checking first turns that into an ECORRUPT naming the file and the byte offset of the bad block.
 *
 * Formats (LevelDB's doc/table_format.md and doc/log_format.md):
 *   - CURRENT names the MANIFEST; the MANIFEST is a log of VersionEdit records (32 KiB blocks of
 *     records with a 7-byte header: masked CRC32C, length, type). Live tables are the files added by
 *     NewFile edits and not removed by DeletedFile edits.
 *   - A table ends with a 48-byte footer (metaindex and index block handles, magic number). Every
 *     block is followed by a 5-byte trailer: compression type (0 none, 1 snappy) and the masked CRC32C
 *     of the block and that type byte. The index block's values are the handles of the data blocks;
 *     the metaindex block's values are the handles of the filter blocks.
 * A MANIFEST whose last record is cut short (a crash while LevelDB appended it) ends there, as it does
 * for LevelDB; a record that fails its checksum is damage.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { uncompressSync } from 'snappy';

const logBlockBytes = 32 * 1024;
const logHeaderBytes = 7;
const tableFooterBytes = 48;
const blockTrailerBytes = 5;
const tableMagic = Buffer.from('57fb808b247547db', 'hex');

/** Damage found in a LevelDB file; `file` is the file name inside the database directory. */
export class LevelTableDamage extends Error {
  constructor(
    readonly file: string,
    detail: string,
  ) {
    super(`LevelDB file ${file} is damaged: ${detail}`);
  }
}

/** LevelDB's CRC mask (a CRC stored next to the data it covers is masked so CRCs of CRCs differ). */
function masked(data: Buffer): number {
  const crc = crc32c(data);
  return ((((crc >>> 15) | (crc << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** A cursor over a buffer that reads LevelDB varints and length-prefixed strings, bounds-checked. */
class Cursor {
  constructor(
    private readonly buf: Buffer,
    public pos: number,
    private readonly end: number,
    private readonly what: () => LevelTableDamage,
  ) {}

  get done(): boolean {
    return this.pos >= this.end;
  }

  varint(): number {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) throw this.what();
      const byte = this.buf[this.pos++];
      value += (byte & 0x7f) * scale;
      if ((byte & 0x80) === 0) {
        if (!Number.isSafeInteger(value)) throw this.what();
        return value;
      }
      scale *= 128;
    }
    throw this.what();
  }

  skip(bytes: number): void {
    if (bytes > this.end - this.pos) throw this.what();
    this.pos += bytes;
  }

  lengthPrefixed(): void {
    this.skip(this.varint());
  }
}

/** The records of a LevelDB log file (the MANIFEST), reassembled from their fragments. */
function logRecords(file: string, buf: Buffer): Buffer[] {
  const records: Buffer[] = [];
  let fragments: Buffer[] | undefined;
  for (let block = 0; block < buf.length; block += logBlockBytes) {
    const end = Math.min(block + logBlockBytes, buf.length);
    let pos = block;
    while (end - pos >= logHeaderBytes) {
      const length = buf.readUInt16LE(pos + 4);
      const type = buf[pos + 6];
      if (type === 0 && length === 0) break; // zero fill to the end of the block
      if (pos + logHeaderBytes + length > end) {
        if (end === buf.length) return records; // cut short at the end of the file: the end of the log
        throw new LevelTableDamage(file, `the log record at byte ${pos} runs past its block`);
      }
      if (masked(buf.subarray(pos + 6, pos + logHeaderBytes + length)) !== buf.readUInt32LE(pos)) {
        throw new LevelTableDamage(file, `the log record at byte ${pos} fails its checksum`);
      }
      const data = buf.subarray(pos + logHeaderBytes, pos + logHeaderBytes + length);
      if (type === 1) records.push(data);
      else if (type === 2) fragments = [data];
      else if ((type === 3 || type === 4) && fragments !== undefined) {
        fragments.push(data);
        if (type === 4) {
          records.push(Buffer.concat(fragments));
          fragments = undefined;
        }
      } else throw new LevelTableDamage(file, `the log record at byte ${pos} has type ${type} out of place`);
      pos += logHeaderBytes + length;
    }
  }
  return records;
}

/** The table files (name and size) a LevelDB database uses, read from its MANIFEST. */
export function liveTables(dir: string): Array<{ name: string; sizeBytes: number }> {
  const manifest = readFileSync(join(dir, 'CURRENT'), 'latin1').trim();
  if (!/^MANIFEST-\d+$/.test(manifest)) throw new LevelTableDamage('CURRENT', `it names "${manifest.slice(0, 40)}", not a MANIFEST`);
  const live = new Map<number, number>();
  for (const record of logRecords(manifest, readFileSync(join(dir, manifest)))) {
    const c = new Cursor(record, 0, record.length, () => new LevelTableDamage(manifest, 'a version edit cannot be decoded'));
    while (!c.done) {
      const tag = c.varint();
      if (tag === 1) c.lengthPrefixed();
      else if (tag === 2 || tag === 3 || tag === 4 || tag === 9) c.varint();
      else if (tag === 5) {
        c.varint();
        c.lengthPrefixed();
      } else if (tag === 6) {
        c.varint();
        live.delete(c.varint());
      } else if (tag === 7) {
        c.varint();
        const number = c.varint();
        live.set(number, c.varint());
        c.lengthPrefixed();
        c.lengthPrefixed();
      } else throw new LevelTableDamage(manifest, `a version edit has unknown tag ${tag}`);
    }
  }
  return [...live].map(([number, sizeBytes]) => ({ name: `${String(number).padStart(6, '0')}.ldb`, sizeBytes }));
}

interface BlockHandle {
  readonly offset: number;
  readonly size: number;
}

/** The footer's two handles: the metaindex block's and the index block's. */
function footerHandles(file: string, buf: Buffer): { metaindex: BlockHandle; index: BlockHandle } {
  if (buf.length < tableFooterBytes || !buf.subarray(buf.length - 8).equals(tableMagic)) {
    throw new LevelTableDamage(file, 'its footer is not a LevelDB table footer');
  }
  const footer = new Cursor(buf, buf.length - tableFooterBytes, buf.length - 8, () => new LevelTableDamage(file, 'its footer cannot be decoded'));
  const metaindex = { offset: footer.varint(), size: footer.varint() };
  return { metaindex, index: { offset: footer.varint(), size: footer.varint() } };
}

/** Check a block's checksum and compression type; returns where its contents end. */
function checkBlock(file: string, buf: Buffer, handle: BlockHandle): number {
  const end = handle.offset + handle.size;
  if (end + blockTrailerBytes > buf.length - tableFooterBytes) throw new LevelTableDamage(file, `a block handle (${handle.size} bytes at byte ${handle.offset}) points past the blocks`);
  if (masked(buf.subarray(handle.offset, end + 1)) !== buf.readUInt32LE(end + 1)) {
    throw new LevelTableDamage(file, `the ${handle.size}-byte block at byte ${handle.offset} fails its checksum`);
  }
  if (buf[end] > 1) throw new LevelTableDamage(file, `the block at byte ${handle.offset} has unknown compression type ${buf[end]}`);
  return end;
}

/** A checked block's contents, uncompressed. */
function blockContents(file: string, buf: Buffer, handle: BlockHandle): Buffer {
  const end = checkBlock(file, buf, handle);
  const stored = buf.subarray(handle.offset, end);
  return buf[end] === 1 ? (uncompressSync(stored) as Buffer) : stored;
}

/** A block handle stored as an index entry's value. */
function handleOf(file: string, value: Buffer): BlockHandle {
  const c = new Cursor(value, 0, value.length, () => new LevelTableDamage(file, 'an index block cannot be decoded'));
  return { offset: c.varint(), size: c.varint() };
}

/** Check one table file: footer, then every block against its checksum. */
export function verifyTable(file: string, buf: Buffer): void {
  const { metaindex, index } = footerHandles(file, buf);
  // The index names the data blocks, the metaindex the filter blocks: each gets its checksum checked.
  for (const handles of [blockContents(file, buf, index), blockContents(file, buf, metaindex)]) {
    for (const { value } of blockEntries(file, handles, 'an index block')) checkBlock(file, buf, handleOf(file, value));
  }
}

/** The entries of a block (keys in full: the block stores each as a suffix of the key before it). */
function blockEntries(file: string, contents: Buffer, what: string): Array<{ key: Buffer; value: Buffer }> {
  const damage = () => new LevelTableDamage(file, `${what} cannot be decoded`);
  if (contents.length < 4) throw damage();
  const restarts = contents.readUInt32LE(contents.length - 4);
  const limit = contents.length - 4 * (restarts + 1);
  if (limit < 0) throw damage();
  const c = new Cursor(contents, 0, limit, damage);
  const entries: Array<{ key: Buffer; value: Buffer }> = [];
  let key = Buffer.alloc(0);
  while (!c.done) {
    const shared = c.varint();
    const unshared = c.varint();
    const valueBytes = c.varint();
    if (shared > key.length) throw damage();
    const at = c.pos;
    c.skip(unshared);
    key = Buffer.concat([key.subarray(0, shared), contents.subarray(at, at + unshared)]);
    const valueAt = c.pos;
    c.skip(valueBytes);
    entries.push({ key, value: contents.subarray(valueAt, valueAt + valueBytes) });
  }
  return entries;
}

/** One entry of a table, its internal key taken apart: the user's key, LevelDB's sequence number, put or delete. */
export interface TableEntry {
  readonly key: Buffer;
  readonly sequence: number;
  readonly deleted: boolean;
  readonly value: Buffer;
}

/** A data block whose checksum fails: its place, and the keys around it (what its entries lay between). */
export interface LostBlock {
  readonly offset: number;
  readonly sizeBytes: number;
  /** The last key of the readable block before it (undefined for the table's first block). */
  readonly after: Buffer | undefined;
  /** The index's separator for it: no key in the block is greater. */
  readonly through: Buffer;
}

/** What can still be read from a damaged table. */
export interface TableSalvage {
  readonly entries: TableEntry[];
  readonly dataBlocks: number;
  readonly lostBlocks: LostBlock[];
  /** Set when not even the footer and index can be read: then no entry can be found. */
  readonly unreadable: string | undefined;
}

/** LevelDB's internal key: the user key, then 8 bytes little-endian of (sequence << 8 | type). */
function internalKey(file: string, key: Buffer): { key: Buffer; sequence: number; deleted: boolean } {
  if (key.length < 8 || key[key.length - 8] > 1) throw new LevelTableDamage(file, 'a data block holds a key that is not a LevelDB internal key');
  return { key: key.subarray(0, key.length - 8), sequence: (key.readUInt32LE(key.length - 8) >>> 8) + key.readUInt32LE(key.length - 4) * 0x100_0000, deleted: key[key.length - 8] === 0 };
}

/**
 * Every entry of a table's data blocks that pass their checksums, and which blocks do not (for
 * salvage: the table itself is set aside, and what it still holds is written back). Needs the footer
 * and the index block; without them nothing can be found.
 */
export function salvageTable(file: string, buf: Buffer): TableSalvage {
  const entries: TableEntry[] = [];
  const lostBlocks: LostBlock[] = [];
  let index: Array<{ key: Buffer; value: Buffer }>;
  try {
    index = blockEntries(file, blockContents(file, buf, footerHandles(file, buf).index), 'an index block');
  } catch (err) {
    if (!(err instanceof LevelTableDamage)) throw err;
    return { entries, dataBlocks: 0, lostBlocks, unreadable: err.message };
  }
  let after: Buffer | undefined;
  for (const { key: separator, value } of index) {
    let handle: BlockHandle = { offset: -1, size: 0 };
    try {
      handle = handleOf(file, value);
      const block = blockEntries(file, blockContents(file, buf, handle), 'a data block').map(({ key, value }) => ({ ...internalKey(file, key), value: Buffer.from(value) }));
      entries.push(...block);
      if (block.length > 0) after = block[block.length - 1].key;
    } catch (err) {
      if (!(err instanceof LevelTableDamage)) throw err;
      lostBlocks.push({ offset: handle.offset, sizeBytes: handle.size, after, through: separator.length >= 8 ? separator.subarray(0, separator.length - 8) : separator });
    }
  }
  return { entries, dataBlocks: index.length, lostBlocks, unreadable: undefined };
}

/**
 * The live tables (the MANIFEST's, as `liveTables`), each with the file that holds it, checked to
 * exist with the size the MANIFEST gives; throws LevelTableDamage naming the first that does not.
 */
export function liveTableFiles(dir: string): Array<{ name: string; file: string }> {
  return liveTables(dir).map(({ name, sizeBytes }) => {
    // Tables written by LevelDB before 1.14 end in .sst.
    const file = [name, name.replace(/\.ldb$/, '.sst')].find((f) => existsSync(join(dir, f)));
    if (file === undefined) throw new LevelTableDamage(name, 'the MANIFEST names it but it is missing');
    const size = statSync(join(dir, file)).size;
    if (size !== sizeBytes) throw new LevelTableDamage(name, `it holds ${size} bytes; the MANIFEST says ${sizeBytes}`);
    return { name, file };
  });
}

/** Check every table a LevelDB database uses; throws LevelTableDamage naming the first bad one. */
export function verifyLevelTables(dir: string): void {
  for (const { name, file } of liveTableFiles(dir)) verifyTable(name, readFileSync(join(dir, file)));
}
