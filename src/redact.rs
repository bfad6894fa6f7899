//! Secrets out of logs: one redaction for every URL this process prints,
//! and the types that make printing a password impossible.
//!
//! Broker and database URLs may carry passwords (in the userinfo, or as a
//! `password=` parameter or key). They are held as [`SecretUrl`], whose
//! `Display` and `Debug` go through [`redact_url`], and a bare password as
//! [`Secret`], which prints as `***`. So any struct holding them (the
//! arguments, the configuration, the broker and database settings) can derive
//! `Debug` and still print no password: the text itself comes out only
//! through a method named `expose`, called where a connection is made (and
//! where the legacy variables are put together into a URL).

use std::fmt;

/// A broker or database URL (or PostgreSQL `key=value` string) that may hold
/// a password. Printed in any way, it shows [`redact_url`] of itself; the URL
/// comes out only through [`SecretUrl::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its password, for the one place each connection is made
    /// (lapin's URI, the PostgreSQL client's configuration). Never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Empty or only whitespace: the setting counts as unset.
    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// What comes before `://`, if anything does; holds no password.
    pub fn scheme(&self) -> Option<&str> {
        self.0.split_once("://").map(|(scheme, _)| scheme)
    }
}

/// What clap builds from a flag or variable, so that even the raw arguments
/// never hold the URL as a plain `String`.
impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl(url)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(&self.0), formatter)
    }
}

/// A password on its own (`RABBITMQ_PASS`): printed as `***`; the text comes
/// out only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The password, to be put into a [`SecretUrl`]. Never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Secret {
        Secret(secret)
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Secret {
        Secret(secret.to_owned())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("\"***\"")
    }
}

/// The URL (or PostgreSQL `key=value` string) with every password replaced
/// by `***`, for logs and errors. Anything it cannot read is not echoed.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let scheme_is_valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if scheme_is_valid {
            return format!("{scheme}://{}", redact_url_rest(rest));
        }
    } else if url.contains('=') {
        return redact_key_values(url);
    }
    "<unparseable URL>".to_owned()
}

fn redact_url_rest(rest: &str) -> String {
    let mut hidden: Vec<(usize, usize)> = Vec::new();
    if let Some(at) = rest.rfind('@') {
        if let Some(colon) = rest[..at].find(':') {
            hidden.push((colon + 1, at));
        }
    }
    // `password=` parameters, up to the next `&` (whatever lies between).
    let lower = rest.to_ascii_lowercase();
    let mut search_from = 0;
    while let Some(found) = lower[search_from..].find("password=") {
        let start = search_from + found;
        let value_start = start + "password=".len();
        if start > 0 && matches!(rest.as_bytes()[start - 1], b'?' | b'&') {
            let value_end = rest[value_start..]
                .find('&')
                .map_or(rest.len(), |end| value_start + end);
            hidden.push((value_start, value_end));
        }
        search_from = value_start;
    }
    hidden.sort_unstable();
    let mut redacted = String::with_capacity(rest.len());
    let mut position = 0;
    for (start, end) in hidden {
        if end <= position {
            continue;
        }
        if start >= position {
            redacted.push_str(&rest[position..start]);
            redacted.push_str("***");
        }
        position = end;
    }
    redacted.push_str(&rest[position..]);
    redacted
}

/// Rewrites a key=value connection string with `password=***`, following the
/// driver's grammar (quoted values, backslash escapes). A string it cannot
/// read is cut at the first `password`.
fn redact_key_values(conninfo: &str) -> String {
    let cut_at_password = || match conninfo.to_ascii_lowercase().find("password") {
        Some(start) => format!("{}password=***", &conninfo[..start]),
        None => conninfo.to_owned(),
    };
    let mut pairs = Vec::new();
    let mut rest = conninfo.trim_start();
    while !rest.is_empty() {
        let Some(equals) = rest.find('=') else {
            return cut_at_password();
        };
        let key = rest[..equals].trim_end();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return cut_at_password();
        }
        let after = rest[equals + 1..].trim_start();
        let Some(value_length) = value_length(after) else {
            return cut_at_password();
        };
        let value = if key.eq_ignore_ascii_case("password") {
            "***"
        } else {
            &after[..value_length]
        };
        pairs.push(format!("{key}={value}"));
        rest = after[value_length..].trim_start();
    }
    pairs.join(" ")
}

/// Length in bytes of the value at the start of `text` (quotes included), or
/// `None` when it is empty or its quote is never closed.
fn value_length(text: &str) -> Option<usize> {
    let mut characters = text.char_indices();
    let quoted = text.starts_with('\'');
    if quoted {
        characters.next();
    }
    while let Some((index, character)) = characters.next() {
        match character {
            '\\' => {
                characters.next();
            }
            '\'' if quoted => return Some(index + 1),
            c if c.is_whitespace() && !quoted => return (index > 0).then_some(index),
            _ => {}
        }
    }
    (!quoted && !text.is_empty()).then_some(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_url_prints_only_redacted() {
        let url = SecretUrl::new("amqp://user:hunter2@host/%2f?password=also-secret");
        let printed = [
            format!("{url}"),
            format!("{url:?}"),
            format!("{url:#?}"),
            format!("{:?}", Some(url.clone())),
        ];
        for text in &printed {
            assert!(
                !text.contains("hunter2") && !text.contains("also-secret"),
                "{text}"
            );
        }
        assert_eq!(printed[0], "amqp://user:***@host/%2f?password=***");
        assert_eq!(printed[1], "\"amqp://user:***@host/%2f?password=***\"");
        assert_eq!(url.expose(), "amqp://user:hunter2@host/%2f?password=also-secret");
        assert_eq!(url.scheme(), Some("amqp"));
        assert_eq!(SecretUrl::new("host=h password=x").scheme(), None);
        assert!(SecretUrl::new(" ").is_blank() && !url.is_blank());
    }

    #[test]
    fn secret_prints_as_stars() {
        let secret = Secret::from("hunter2");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "\"***\"");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn url_password_is_hidden() {
        assert_eq!(
            redact_url("postgres://postgres:secret@127.0.0.1:5432/test"),
            "postgres://postgres:***@127.0.0.1:5432/test"
        );
        assert_eq!(
            redact_url("postgresql://watcher:s%40cret@db.example:6432/registry?sslmode=disable"),
            "postgresql://watcher:***@db.example:6432/registry?sslmode=disable"
        );
    }

    #[test]
    fn url_without_password_is_unchanged() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://127.0.0.1/test",
            "postgresql:///test?host=/run/postgresql",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn raw_at_and_slash_in_a_url_password_do_not_leak_its_tail() {
        let redacted = redact_url("postgres://u:pa/ss@wo@rd@host/db");
        assert_eq!(redacted, "postgres://u:***@host/db");
        assert!(!redacted.contains("ss") && !redacted.contains("wo"));
    }

    #[test]
    fn url_password_parameter_is_hidden() {
        assert_eq!(
            redact_url("postgres://u@host/db?sslmode=require&PASSWORD=se@cret&application_name=x"),
            "postgres://u@host/db?sslmode=require&PASSWORD=***&application_name=x"
        );
        let redacted = redact_url("postgres://host/db?password=xy@zw");
        assert_eq!(redacted, "postgres://host/db?password=***");
    }

    #[test]
    fn key_value_password_is_hidden() {
        assert_eq!(
            redact_url("host=localhost user=postgres password=secret dbname=test"),
            "host=localhost user=postgres password=*** dbname=test"
        );
        assert_eq!(
            redact_url("host=h password = 'se cr\\'et' dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(redact_url("password=s\\ ecret host=h"), "password=*** host=h");
    }

    #[test]
    fn unreadable_key_value_string_is_cut_at_the_password() {
        assert_eq!(redact_url("host=h password='never closed"), "host=h password=***");
        assert_eq!(redact_url("host=h junk password"), "host=h junk password=***");
        assert_eq!(redact_url("host=h user="), "host=h user=");
    }

    #[test]
    fn redaction_hides_the_password() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqp://user:secret@rabbitmq/%2f?heartbeat=10"),
            "amqp://user:***@rabbitmq/%2f?heartbeat=10"
        );
    }

    #[test]
    fn redaction_keeps_urls_without_password() {
        assert_eq!(
            redact_url("amqp://guest@127.0.0.1:5672/%2f"),
            "amqp://guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://rabbitmq"), "amqp://rabbitmq");
    }

    #[test]
    fn redaction_hides_passwords_with_unescaped_delimiters() {
        for (url, password) in [
            ("amqp://user:pa/ss@host:5672/%2f", "pa/ss"),
            ("amqp://user:p@ss@host/%2f", "p@ss"),
            ("amqp://user:pa?s#s@host/%2f", "pa?s#s"),
            ("amqp://user:x:y@host/", "x:y"),
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains(password), "{url} became {redacted}");
            assert!(
                redacted.starts_with("amqp://user:***@"),
                "{url} became {redacted}"
            );
        }
    }

    #[test]
    fn invalid_urls_leak_nothing() {
        for url in [
            "guest:secret@127.0.0.1:5672",
            "amqp:guest:secret@host",
            "host=rabbitmq password=secret",
            "://guest:secret@host",
            "1amqp://guest:secret@host",
            "",
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains("secret"), "{url:?} became {redacted:?}");
        }
        assert_eq!(redact_url("guest:secret@127.0.0.1:5672"), "<unparseable URL>");
    }
}
