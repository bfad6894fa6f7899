//! Content hashes: SHA-256 and XXH3-128 in one streaming pass, over a file
//! opened so that nothing but the regular file that was looked at is read.
//!
//! A fixed 256 KiB buffer is reused for the whole file, so memory does not grow
//! with file size; both digests see the same bytes in the same read. Each
//! thread (each worker) allocates it once and keeps it: zeroing a fresh one
//! per file cost five times the SHA-256 of a 4 KiB file (BENCHMARKS.md). Long
//! hashes (a 1 TiB file takes minutes) log their progress every
//! [`PROGRESS_INTERVAL`].
//!
//! Between a worker's `stat` and its `open`, anything may take the file's
//! place. [`open_regular`] never follows a symlink (`O_NOFOLLOW`: a symlink to
//! `/dev/zero` or a symlink loop fails at once), never waits for a FIFO's
//! writer (`O_NONBLOCK`; it has no effect on reading a regular file), and
//! checks with `fstat` that what it opened is a regular file with the device
//! and inode the `stat` saw. Anything else is [`Replaced`]: the worker looks
//! again later, as for a file that changed while it was read.

use std::cell::RefCell;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

const BUFFER_SIZE: usize = 256 * 1024;

thread_local! {
    /// This thread's read buffer, allocated on its first hash.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How often a long hash says how far it got.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// The target of this module's log lines: the worker's.
const LOG_TARGET: &str = "file_watcher::worker";

/// Lower-case hex digests of one file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub sha256: String,
    pub xxh128: String,
    /// Bytes actually read (may differ from a `stat` taken before, if the file changed).
    pub bytes: u64,
}

/// Which file a `stat` saw: its device and inode. The same path naming
/// another inode is another file, whatever its size and times say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub device: u64,
    pub inode: u64,
}

impl FileId {
    pub fn of(metadata: &Metadata) -> FileId {
        FileId {
            device: metadata.dev(),
            inode: metadata.ino(),
        }
    }
}

/// The path no longer names the regular file that was looked at: a symlink,
/// a FIFO, a socket, a device or another file took its place.
#[derive(Debug, thiserror::Error)]
#[error("replaced by {0} since it was looked at")]
pub struct Replaced(&'static str);

pub fn is_replaced(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Replaced>())
}

fn replaced(by: &'static str) -> io::Error {
    io::Error::other(Replaced(by))
}

/// Opens `path` for hashing, if it still is the regular file `expected`
/// (see the module docs); [`Replaced`] if not.
pub fn open_regular(path: &Path, expected: FileId) -> io::Result<File> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => return Err(replaced("a symlink")),
        // A socket (or a device without a driver): nothing to read.
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => {
            return Err(replaced("a socket or device"))
        }
        Err(error) => return Err(error),
    };
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(replaced("a FIFO, socket or device"));
    }
    if FileId::of(&metadata) != expected {
        return Err(replaced("another file"));
    }
    Ok(file)
}

/// Hashes `file` (of `total` bytes, at `path`), but gives up (with the
/// [`Stopped`] error, see [`is_stopped`]) as soon as `stop` is raised, so
/// shutdown never waits for a multi-gigabyte read. Logs its progress every
/// [`PROGRESS_INTERVAL`].
pub fn hash_file_until(file: &File, path: &str, total: u64, stop: &AtomicBool) -> io::Result<Digests> {
    hash_reader(Watched {
        inner: file,
        stop,
        progress: Progress::new(total, Instant::now(), PROGRESS_INTERVAL),
        path,
    })
}

/// A reader that stops when told to and reports how far it got.
struct Watched<'a, R> {
    inner: R,
    stop: &'a AtomicBool,
    progress: Progress,
    path: &'a str,
}

impl<R: Read> Read for Watched<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Acquire) {
            // Not `Interrupted`: `hash_reader` retries that one.
            return Err(io::Error::other(Stopped));
        }
        let read = self.inner.read(buffer)?;
        if let Some(report) = self.progress.advance(read as u64, Instant::now()) {
            log::info!(target: LOG_TARGET, "hashing {}: {report}", self.path);
        }
        Ok(read)
    }
}

/// How far a hash got, and when to say so next.
#[derive(Debug)]
struct Progress {
    done: u64,
    total: u64,
    started: Instant,
    interval: Duration,
    next: Instant,
}

impl Progress {
    fn new(total: u64, now: Instant, interval: Duration) -> Progress {
        Progress {
            done: 0,
            total,
            started: now,
            interval,
            next: now + interval,
        }
    }

    /// Counts `read` more bytes; a report when one is due.
    fn advance(&mut self, read: u64, now: Instant) -> Option<String> {
        self.done += read;
        if now < self.next {
            return None;
        }
        self.next = now + self.interval;
        let elapsed = now.duration_since(self.started);
        const MIB: f64 = (1 << 20) as f64;
        let rate = self.done as f64 / MIB / elapsed.as_secs_f64().max(0.001);
        let percent = self.done as f64 * 100.0 / self.total.max(1) as f64;
        Some(format!(
            "{} of {} bytes ({percent:.0}%) in {} s, {rate:.1} MiB/s",
            self.done,
            self.total,
            elapsed.as_secs()
        ))
    }
}

/// The error a stopped hash ends with.
#[derive(Debug, thiserror::Error)]
#[error("stopped")]
pub struct Stopped;

pub fn is_stopped(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Stopped>())
}

pub fn hash_reader(reader: impl Read) -> io::Result<Digests> {
    BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.is_empty() {
                buffer.resize(BUFFER_SIZE, 0);
            }
            hash_with(reader, &mut buffer)
        }
        // Only if a reader itself hashed something on this thread.
        Err(_) => hash_with(reader, &mut vec![0; BUFFER_SIZE]),
    })
}

fn hash_with(mut reader: impl Read, buffer: &mut [u8]) -> io::Result<Digests> {
    let mut sha256 = Sha256::new();
    let mut xxh3 = Xxh3::new();
    let mut bytes = 0u64;
    loop {
        let read = match reader.read(buffer) {
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
        let id = FileId::of(&std::fs::metadata(&path).unwrap());
        let stop = AtomicBool::new(false);
        let hash = |stop: &AtomicBool| hash_file_until(&open_regular(&path, id)?, "a.flac", 3, stop);
        assert_eq!(hash(&stop).unwrap().xxh128, "06b05ab6733a618578af5f94892f3950");
        stop.store(true, Ordering::Release);
        assert!(is_stopped(&hash(&stop).unwrap_err()));
    }

    #[test]
    fn only_the_regular_file_that_was_looked_at_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.flac");
        std::fs::write(&path, b"abc").unwrap();
        let id = FileId::of(&std::fs::metadata(&path).unwrap());
        assert!(open_regular(&path, id).is_ok());
        // Another file in its place.
        let other = dir.path().join("b.flac");
        std::fs::write(&other, b"abc").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(is_replaced(&open_regular(&path, id).unwrap_err()));
        // A symlink to /dev/zero, a loop, a FIFO with no writer: refused at once.
        let id = FileId::of(&std::fs::symlink_metadata(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(is_replaced(&open_regular(&path, id).unwrap_err()));
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("a.flac", &path).unwrap();
        assert!(is_replaced(&open_regular(&path, id).unwrap_err()));
        std::fs::remove_file(&path).unwrap();
        let status = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(status.success());
        assert!(is_replaced(&open_regular(&path, id).unwrap_err()));
        // Nothing there: the usual NotFound.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            open_regular(&path, id).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn progress_is_reported_once_per_interval() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut progress = Progress::new(4 << 20, start, Duration::from_secs(10));
        assert_eq!(progress.advance(1 << 20, start + second), None);
        assert_eq!(
            progress.advance(1 << 20, start + 10 * second).as_deref(),
            Some("2097152 of 4194304 bytes (50%) in 10 s, 0.2 MiB/s")
        );
        assert_eq!(progress.advance(1 << 20, start + 11 * second), None);
        assert!(progress.advance(1 << 20, start + 20 * second).is_some());
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
