/**
 * The C library's functions that Node's fs lacks (posix_fadvise, fcntl), called through koffi's
 * foreign-function interface. The library is loaded once; where it cannot be (not a glibc Linux),
 * every function is undefined and its caller says what it does without it.
 */
import koffi, { type LibraryHandle } from 'koffi';

function load(): LibraryHandle | undefined {
  try {
    return koffi.load('libc.so.6');
  } catch {
    return undefined;
  }
}

const libc = load();

/** A C library function by its C declaration, or undefined where the library or the function is missing. */
export function libcFunction<F>(declaration: string): F | undefined {
  try {
    return libc?.func(declaration) as F | undefined;
  } catch {
    return undefined;
  }
}

/** errno as the last C library call left it. */
export function libcErrno(): number {
  return koffi.errno();
}
