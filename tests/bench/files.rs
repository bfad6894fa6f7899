//! Writing the files the daemons watch: fast enough that the writer is never
//! what a figure measures (one `open`/`write`/`close` per file, no process
//! per file), or paced to a rate, recording when each file's last write
//! closed.
//!
//! Contents are unique per file (the first 32 bytes name the file), the same
//! size, and otherwise fixed, so every file is a distinct `created` with a
//! distinct hash and nothing is deduplicated away.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Deadline;

/// Where file number `index` goes below a root.
#[derive(Clone, Copy)]
pub enum Layout {
    /// `album<index / 100>/track<index>.flac`: a library of albums of 100 tracks.
    Albums,
    /// `track<index>.flac`, all in the root.
    Flat,
}

/// Files per album directory in [`Layout::Albums`].
const ALBUM: usize = 100;

impl Layout {
    pub fn path(self, root: &Path, index: usize) -> PathBuf {
        match self {
            Layout::Albums => root
                .join(format!("album{}", index / ALBUM))
                .join(format!("track{index}.flac")),
            Layout::Flat => root.join(format!("track{index}.flac")),
        }
    }

    /// True when file `index` is the first of a directory that must be made first.
    fn opens_directory(self, index: usize) -> bool {
        matches!(self, Layout::Albums) && index.is_multiple_of(ALBUM)
    }
}

/// What one writer did.
pub struct Written {
    /// Each file's path (as the daemon reports it) and when its last write closed.
    pub files: Vec<(String, Instant)>,
    /// Just before the first file was opened.
    pub started: Instant,
}

impl Written {
    /// When the last file's write closed (`started` if there were none).
    pub fn finished(&self) -> Instant {
        self.files.last().map_or(self.started, |(_, closed)| *closed)
    }
}

/// Writes `count` files of `size` bytes below `root`, as fast as it can or
/// at `rate` files per second (each file at its due time; a writer behind
/// schedule writes at once, without a burst to catch up beyond that).
/// `tag` goes into every file's contents, so two writers never make the
/// same file twice.
pub fn write(
    root: &Path,
    layout: Layout,
    count: usize,
    size: usize,
    rate: Option<f64>,
    tag: &str,
    deadline: Deadline,
) -> Result<Written, String> {
    let mut content = vec![b'.'; size];
    let mut files = Vec::with_capacity(count);
    let started = Instant::now();
    for index in 0..count {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(index as f64 / rate);
            let now = Instant::now();
            if due > now {
                // Pacing, not synchronisation: the schedule is the point.
                std::thread::sleep(due - now);
            }
        }
        if deadline.passed() {
            return Err(format!(
                "writing {}: {index} of {count} files by the deadline",
                root.display()
            ));
        }
        let path = layout.path(root, index);
        if layout.opens_directory(index) {
            let directory = path.parent().expect("album files have a parent");
            fs::create_dir_all(directory)
                .map_err(|error| format!("create {}: {error}", directory.display()))?;
        }
        stamp(&mut content, tag, index);
        fs::write(&path, &content).map_err(|error| format!("write {}: {error}", path.display()))?;
        let closed = Instant::now();
        files.push((path_text(&path)?, closed));
    }
    Ok(Written { files, started })
}

/// Rewrites every `every`-th of the `count` files below `root` with new
/// contents of the same size (`tag` makes them differ from what any other
/// rewrite wrote): a change the daemon must find by hashing.
pub fn rewrite(
    root: &Path,
    layout: Layout,
    count: usize,
    size: usize,
    every: usize,
    tag: &str,
) -> Result<Vec<String>, String> {
    let mut content = vec![b'#'; size];
    let mut paths = Vec::new();
    for index in (0..count).step_by(every.max(1)) {
        let path = layout.path(root, index);
        stamp(&mut content, tag, index);
        fs::write(&path, &content).map_err(|error| format!("rewrite {}: {error}", path.display()))?;
        paths.push(path_text(&path)?);
    }
    Ok(paths)
}

/// Writes a file of `mib` MiB of pseudo-random bytes (xorshift: cheap, and
/// nothing a compressor or a hash could shortcut).
pub fn write_big(path: &Path, mib: usize) -> Result<(), String> {
    let mut file = fs::File::create(path).map_err(|error| format!("create {}: {error}", path.display()))?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk)
            .map_err(|error| format!("write {}: {error}", path.display()))?;
    }
    Ok(())
}

/// Puts `<tag> <index>` at the start of `content`, padded, so each file differs.
fn stamp(content: &mut [u8], tag: &str, index: usize) {
    let label = format!("{tag} {index:<24}");
    let length = label.len().min(content.len());
    content[..length].copy_from_slice(&label.as_bytes()[..length]);
}

pub fn path_text(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}
