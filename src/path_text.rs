//! Path text: how a file system path, which is bytes, becomes the `String`
//! that settle, the jobs, the registry key and the message carry, and back.
//!
//! Linux names are bytes; old SMB shares hold names in Latin-1 or CP1252
//! that are not valid UTF-8. PostgreSQL `text` and JSON strings hold only
//! Unicode, and consumers read `file_path` as a string. So the text of a path
//! is:
//!
//! - every valid UTF-8 character as itself, except that a backslash followed
//!   by `x` or by another backslash (or by an escaped byte, which starts with
//!   one) is written twice;
//! - every byte of an invalid UTF-8 sequence as `\x` and two lower-case hex
//!   digits (`caf\xe9.flac` for Latin-1 `café.flac`).
//!
//! [`decode`] reverses [`encode`], so the encoding is injective: two names
//! that differ only in an invalid byte stay two files, and a valid name that
//! spells `\xff` (written `\\xff`) never meets the byte 0xFF. Every name
//! that is valid UTF-8 and has no backslash before `x` or `\` is unchanged,
//! byte for byte. `/` is never escaped and the text of `a/b` is the text of
//! `a`, `/`, the text of `b`, so prefixes, parents and extensions work on the
//! text as on the path.
//!
//! The rule of the code: a path from notify or a walk becomes text through
//! [`admit`] (or [`encode`]); text becomes a path for any file system call
//! through [`decode`]. Nothing else converts between the two.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::{LazyLock, Mutex};

/// Bytes in the longest path the kernel accepts, its terminating NUL
/// included (Linux `PATH_MAX`): a path of this many bytes or more fails every
/// call with `ENAMETOOLONG`, so it can be neither watched nor read.
pub const PATH_MAX: usize = 4096;

/// The text of `path`; see the module docs.
pub fn encode(path: &OsStr) -> String {
    let mut text = String::with_capacity(path.len());
    for chunk in path.as_bytes().utf8_chunks() {
        let mut characters = chunk.valid().chars().peekable();
        while let Some(character) = characters.next() {
            text.push(character);
            // Doubled when what follows it in the text is `x` or a backslash
            // (an escaped byte starts with one).
            let before_escape = match characters.peek() {
                Some(next) => matches!(next, 'x' | '\\'),
                None => !chunk.invalid().is_empty(),
            };
            if character == '\\' && before_escape {
                text.push('\\');
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    text
}

/// The path whose text is `text`; borrowed when nothing is escaped (no
/// backslash), which is every ordinary name.
pub fn decode(text: &str) -> Cow<'_, Path> {
    if !text.contains('\\') {
        return Cow::Borrowed(Path::new(text));
    }
    let bytes = text.as_bytes();
    let mut path = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' {
            if bytes.get(index + 1) == Some(&b'\\') {
                path.push(b'\\');
                index += 2;
                continue;
            }
            if bytes.get(index + 1) == Some(&b'x') {
                let digits = bytes
                    .get(index + 2..index + 4)
                    .filter(|digits| digits.iter().all(u8::is_ascii_hexdigit));
                if let Some(digits) = digits {
                    let digits = std::str::from_utf8(digits).expect("ASCII hex digits");
                    path.push(u8::from_str_radix(digits, 16).expect("two hex digits"));
                    index += 4;
                    continue;
                }
            }
        }
        // Anything else, a lone backslash included, stands for itself.
        path.push(bytes[index]);
        index += 1;
    }
    Cow::Owned(OsString::from_vec(path).into())
}

/// The text of a path met in an event or a walk, or `None` when the path is
/// too long for any file system call (`PATH_MAX`): then it is skipped.
///
/// Either kind of unusual path is warned about once, naming it, however many
/// events and walks meet it: a name that is not valid UTF-8 because
/// consumers receive it escaped and must decode it (or someone should rename
/// it, e.g. with `convmv`), a path that is too long because nothing below it
/// is announced.
pub fn admit(path: &Path) -> Option<String> {
    let text = encode(path.as_os_str());
    let length = path.as_os_str().len();
    // The text of a valid UTF-8 path without doubled backslashes is the path.
    let unusual = text.len() != length;
    if length >= PATH_MAX {
        warn_once(&text, || {
            format!(
                "{text}: the path is {length} bytes, longer than the system allows \
                 (PATH_MAX {PATH_MAX}): it cannot be watched or read, so it and \
                 everything below it are skipped"
            )
        });
        return None;
    }
    if unusual && path.to_str().is_none() {
        warn_once(&text, || {
            format!(
                "{text}: the name is not valid UTF-8; it is announced with each invalid \
                 byte written as \\xNN (see OPERATIONS.md, \"Names\")"
            )
        });
    }
    Some(text)
}

/// Unusual paths named so far.
#[derive(Default)]
struct Warned {
    paths: HashSet<String>,
    /// [`WARNED_LIMIT`] was reached: no more are named.
    full: bool,
}

static WARNED: LazyLock<Mutex<Warned>> = LazyLock::new(Mutex::default);

/// Past this many unusual paths, they are no longer named one by one (the
/// set would grow with a tree that is all unusual).
const WARNED_LIMIT: usize = 10_000;

/// Logs the warning `message` makes, unless `text` was warned about
/// before. One set for the process: the scanner, the settle stage and the
/// start-up seeding meet the same paths, and a warning is about the path,
/// not about who met it.
fn warn_once(text: &str, message: impl FnOnce() -> String) {
    let mut warned = WARNED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if warned.full || warned.paths.contains(text) {
        return;
    }
    if warned.paths.len() >= WARNED_LIMIT {
        warned.full = true;
        warned.paths = HashSet::new();
        log::warn!(
            "more than {WARNED_LIMIT} paths are not valid UTF-8 or too long: not naming any more of them"
        );
        return;
    }
    warned.paths.insert(text.to_owned());
    log::warn!("{}", message());
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn text(bytes: &[u8]) -> String {
        encode(OsStr::from_bytes(bytes))
    }

    fn bytes(text: &str) -> Vec<u8> {
        decode(text).as_os_str().as_bytes().to_vec()
    }

    #[test]
    fn ordinary_names_are_unchanged() {
        for name in [
            "/data/music/Artist/Album (2020)/01. Track.flac",
            "/m/line\nbreak \"quoted\" it's.flac",
            "/m/🎵 Ünïcødé 音楽.flac",
            "/m/caf\u{e9}.flac",
            "/m/cafe\u{301}.flac",
            "/m/C:\\Music\\track.flac",
            "/m/trailing\\",
            "/m/a\\b\\/c",
            "",
        ] {
            assert_eq!(text(name.as_bytes()), name);
            assert_eq!(bytes(name), name.as_bytes());
        }
        assert!(matches!(decode("/m/plain.flac"), Cow::Borrowed(_)));
    }

    #[test]
    fn invalid_bytes_are_escaped_and_backslashes_before_escapes_doubled() {
        assert_eq!(text(b"/m/caf\xe9.flac"), "/m/caf\\xe9.flac");
        assert_eq!(text(b"/m/\xff\xfe"), "/m/\\xff\\xfe");
        // A valid name that spells an escape is told apart by a doubled backslash.
        assert_eq!(text(b"/m/a\\xff.flac"), "/m/a\\\\xff.flac");
        assert_eq!(text(b"/m/a\\\\b"), "/m/a\\\\\\b");
        // A backslash right before an escaped byte, and before a later chunk's `x`.
        assert_eq!(text(b"/m/a\\\xff"), "/m/a\\\\\\xff");
        assert_eq!(text(b"\xff\\x"), "\\xff\\\\x");
        // A truncated sequence before valid text: only its bytes are escaped.
        assert_eq!(text(b"\xe2\x82/x"), "\\xe2\\x82/x");
    }

    #[test]
    fn decode_takes_what_encode_never_writes_literally() {
        assert_eq!(bytes("\\xZZ"), b"\\xZZ");
        assert_eq!(bytes("\\x4"), b"\\x4");
        assert_eq!(bytes("\\"), b"\\");
        assert_eq!(bytes("\\q"), b"\\q");
        assert_eq!(bytes("\\xFF"), b"\xff");
    }

    #[test]
    fn names_that_differ_in_an_invalid_byte_stay_apart() {
        let names: [&[u8]; 6] = [
            b"a\xff.flac",
            b"a\xfe.flac",
            b"a\\xff.flac",
            b"a\\\xff.flac",
            b"a\\\\xff.flac",
            b"a\xc3\xbf.flac", // "aÿ.flac": U+00FF, valid
        ];
        let texts: HashSet<String> = names.iter().map(|name| text(name)).collect();
        assert_eq!(texts.len(), names.len(), "{texts:?}");
    }

    /// Property: decode(encode(x)) == x for arbitrary bytes (hence encode is
    /// injective), and the text composes over `/`.
    #[test]
    fn round_trip_on_random_bytes() {
        let mut random = rand::rng();
        // Bytes that make the interesting cases likely.
        let alphabet: &[u8] = b"\\x/af09\xff\xfe\xc3\xa9\xe2\x82\xac\xf0\x9f\x8e\xb5\x80";
        for round in 0..20_000 {
            let length = random.random_range(0..24);
            let name: Vec<u8> = (0..length)
                .map(|_| {
                    if round % 2 == 0 {
                        alphabet[random.random_range(0..alphabet.len())]
                    } else {
                        random.random()
                    }
                })
                .filter(|byte| *byte != 0)
                .collect();
            let encoded = text(&name);
            assert_eq!(bytes(&encoded), name, "round trip of {name:?} via {encoded:?}");
            if let Some(at) = name.iter().position(|byte| *byte == b'/') {
                let (left, right) = (&name[..at], &name[at + 1..]);
                assert_eq!(encoded, format!("{}/{}", text(left), text(right)), "{name:?}");
            }
        }
    }
}
