//! Content hashes: SHA-256 and XXH3-128 in one streaming pass.
//!
//! A fixed 256 KiB buffer is reused for the whole file, so memory does not grow
//! with file size; both digests see the same bytes in the same read.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

const BUFFER_SIZE: usize = 256 * 1024;

/// Lower-case hex digests of one file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub sha256: String,
    pub xxh128: String,
    /// Bytes actually read (may differ from a `stat` taken before, if the file changed).
    pub bytes: u64,
}

/// Hashes the file at `path`, but gives up (with the [`Stopped`] error, see
/// [`is_stopped`]) as soon as `stop` is raised, so shutdown never waits for a
/// multi-gigabyte read.
pub fn hash_file_until(path: &Path, stop: &AtomicBool) -> io::Result<Digests> {
    hash_reader(Stoppable {
        inner: File::open(path)?,
        stop,
    })
}

struct Stoppable<'a, R> {
    inner: R,
    stop: &'a AtomicBool,
}

impl<R: Read> Read for Stoppable<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Acquire) {
            // Not `Interrupted`: `hash_reader` retries that one.
            return Err(io::Error::other(Stopped));
        }
        self.inner.read(buffer)
    }
}

/// The error a stopped hash ends with.
#[derive(Debug, thiserror::Error)]
#[error("stopped")]
pub struct Stopped;

pub fn is_stopped(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Stopped>())
}

pub fn hash_reader(mut reader: impl Read) -> io::Result<Digests> {
    let mut sha256 = Sha256::new();
    let mut xxh3 = Xxh3::new();
    let mut buffer = vec![0u8; BUFFER_SIZE];
    let mut bytes = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        sha256.update(&buffer[..read]);
        xxh3.update(&buffer[..read]);
        bytes += read as u64;
    }
    Ok(Digests {
        sha256: format!("{:x}", sha256.finalize()),
        xxh128: format!("{:032x}", xxh3.digest128()),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors agree with Python's `hashlib.sha256` and `xxhash.xxh128`.
    #[test]
    fn test_vectors() {
        let empty = hash_reader(&b""[..]).unwrap();
        assert_eq!(
            empty.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(empty.xxh128, "99aa06d3014798d86001c324468d497f");
        let abc = hash_reader(&b"abc"[..]).unwrap();
        assert_eq!(
            abc.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(abc.xxh128, "06b05ab6733a618578af5f94892f3950");
        let mebibyte: Vec<u8> = (0..4096).flat_map(|_| 0..=255u8).collect();
        let big = hash_reader(&mebibyte[..]).unwrap();
        assert_eq!(
            big.sha256,
            "fbbab289f7f94b25736c58be46a994c441fd02552cc6022352e3d86d2fab7c83"
        );
        assert_eq!(big.xxh128, "1b208d2839093774d36c0e13a3df139e");
        assert_eq!(big.bytes, 1 << 20);
    }

    #[test]
    fn a_raised_stop_flag_ends_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.flac");
        std::fs::write(&path, b"abc").unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(
            hash_file_until(&path, &stop).unwrap().xxh128,
            "06b05ab6733a618578af5f94892f3950"
        );
        stop.store(true, Ordering::Release);
        assert!(is_stopped(&hash_file_until(&path, &stop).unwrap_err()));
    }

    /// Reads arrive in odd-sized pieces; the digest must not depend on them.
    #[test]
    fn chunking_does_not_change_the_digest() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(7).min(buffer.len());
                buffer[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31) as u8).collect();
        assert_eq!(
            hash_reader(Trickle(&data)).unwrap(),
            hash_reader(&data[..]).unwrap()
        );
    }
}
