/**
 * Sizes the way qemu-img takes and prints them: a number with an optional binary suffix
 * (K, M, G, T, P, E; also KiB… and KB… meaning the same powers of 1024), and "10 GiB" on output.
 */

const units = ['', 'K', 'M', 'G', 'T', 'P', 'E'];

export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?\s*$/i.exec(text);
  if (match === null) throw new Error(`${JSON.stringify(text)} is not a size (examples: 4096, 512K, 10G, 1T)`);
  const exponent = units.indexOf(match[2].toUpperCase());
  const bytes = Number(match[1]) * 1024 ** exponent;
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new Error(`${JSON.stringify(text)} is not a whole, positive number of bytes`);
  return bytes;
}

export function formatSize(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const digits = value >= 100 || Number.isInteger(value) ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${units[unit]}iB`;
}
