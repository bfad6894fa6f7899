//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in `DATABASE_URL`, with
//! libpq's meaning, over rustls.
//!
//! The `postgres` driver itself knows only `sslmode=disable|prefer|require`
//! and refuses the other parameters, so they are taken out of the URL here,
//! and what is left goes to the driver with the driver's nearest mode. How
//! much of the certificate is checked is then the rustls verifier's job
//! ([`Verify`](crate::tls::Verify)):
//!
//! | sslmode       | TLS                          | server certificate checked       |
//! |---------------|------------------------------|----------------------------------|
//! | `disable`     | never                        | -                                |
//! | `prefer` (default) | if the server offers it | no                               |
//! | `require`     | always                       | no; with `sslrootcert`, chain (libpq's rule) |
//! | `verify-ca`   | always                       | chain and dates                  |
//! | `verify-full` | always                       | chain, dates and host name       |
//!
//! Roots come from `sslrootcert`; without it (or with `sslrootcert=system`)
//! from the roots compiled into the binary, since the scratch image has no
//! system store (libpq would read `~/.postgresql/root.crt`). `sslcert` and
//! `sslkey` name a client certificate for servers that ask for one.
//!
//! Unlike libpq, `prefer` does not try again without TLS when the TLS
//! handshake itself fails (only when the server declines TLS); with no
//! verification in `prefer` such a failure means a broken server.

use std::path::{Path, PathBuf};

use postgres::config::SslMode as DriverMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::redact::SecretUrl;
use crate::tls::{ClientTls, Identity, Trust, Verify};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` (plaintext first, TLS if refused) is not offered.
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    /// The driver's nearest mode: it only decides whether TLS is asked for
    /// and whether a server without TLS is acceptable.
    fn driver_mode(self) -> DriverMode {
        match self {
            SslMode::Disable => DriverMode::Disable,
            SslMode::Prefer => DriverMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverMode::Require,
        }
    }
}

/// The database URL split into what the driver reads and how to do TLS.
pub struct DatabaseTls {
    /// The URL without the TLS parameters; still holds the password.
    pub url: SecretUrl,
    pub mode: SslMode,
    pub client: ClientTls,
}

impl DatabaseTls {
    /// Reads the TLS parameters of `url` and the files they name. The error
    /// says which parameter or file is wrong, never the password.
    pub fn from_url(url: &SecretUrl) -> Result<DatabaseTls, String> {
        let (rest, parameters) = split_tls_parameters(url.expose())?;
        let mut mode = SslMode::Prefer;
        let mut root = None;
        let mut certificate = None;
        let mut key = None;
        for (name, value) in parameters {
            match name.as_str() {
                "sslmode" => mode = SslMode::parse(&value)?,
                "sslrootcert" => root = Some(value),
                "sslcert" => certificate = Some(PathBuf::from(value)),
                _ => key = Some(PathBuf::from(value)),
            }
        }
        let trust = match root.as_deref() {
            None | Some("system") => Trust::bundled(),
            Some(path) => {
                Trust::from_file(Path::new(path)).map_err(|error| format!("sslrootcert: {error}"))?
            }
        };
        let verify = match mode {
            SslMode::Disable | SslMode::Prefer => Verify::Nothing,
            SslMode::Require if root.is_none() => Verify::Nothing,
            SslMode::Require | SslMode::VerifyCa => Verify::ChainOnly,
            SslMode::VerifyFull => Verify::Full,
        };
        let identity = match (&certificate, &key) {
            (None, None) => None,
            (Some(certificate), Some(key)) => Some(
                Identity::from_files(certificate, key).map_err(|error| format!("sslcert/sslkey: {error}"))?,
            ),
            _ => return Err("sslcert and sslkey must be given together".to_owned()),
        };
        let client = ClientTls::new(&trust, verify, identity.as_ref()).map_err(|error| error.to_string())?;
        Ok(DatabaseTls {
            url: SecretUrl::new(rest),
            mode,
            client,
        })
    }

    /// Sets the driver's mode on `config`.
    pub fn apply(&self, config: &mut postgres::Config) {
        config.ssl_mode(self.mode.driver_mode());
    }

    /// The connector every connection of this database is opened with.
    pub fn connector(&self) -> MakeRustlsConnect {
        MakeRustlsConnect::new((*self.client.config()).clone())
    }
}

const TLS_PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// `url` without the TLS parameters, and those parameters (name, decoded
/// value) in order. Handles both the URL form (`?sslmode=…&…`) and the
/// `key=value` form.
fn split_tls_parameters(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), Vec::new()));
        };
        let mut kept = Vec::new();
        let mut taken = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_PARAMETERS.contains(&name) {
                taken.push((name.to_owned(), percent_decode(value)?));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, taken));
    }
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    let mut rest = url.trim_start();
    while !rest.is_empty() {
        let equals = rest
            .find('=')
            .ok_or("a key=value connection string has a key without a value")?;
        let name = rest[..equals].trim_end();
        let after = rest[equals + 1..].trim_start();
        let (value, length) = key_value(after)?;
        if TLS_PARAMETERS.contains(&name) {
            taken.push((name.to_owned(), value));
        } else {
            kept.push(format!("{name}={}", &after[..length]));
        }
        rest = after[length..].trim_start();
    }
    Ok((kept.join(" "), taken))
}

/// The unescaped value at the start of `text` and its length in bytes there
/// (quotes included), by libpq's rules: `'quoted'` or bare up to whitespace,
/// backslash escaping the next character.
fn key_value(text: &str) -> Result<(String, usize), String> {
    let quoted = text.starts_with('\'');
    let mut value = String::new();
    let mut characters = text.char_indices().skip(usize::from(quoted));
    while let Some((index, character)) = characters.next() {
        match character {
            '\\' => match characters.next() {
                Some((_, escaped)) => value.push(escaped),
                None => break,
            },
            '\'' if quoted => return Ok((value, index + 1)),
            c if c.is_whitespace() && !quoted => return Ok((value, index)),
            c => value.push(c),
        }
    }
    if quoted {
        return Err("a quoted value in the connection string is never closed".to_owned());
    }
    Ok((value, text.len()))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("a TLS parameter holds a bad %-escape")?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "a TLS parameter is not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Vec<(String, String)>) {
        split_tls_parameters(url).unwrap()
    }

    #[test]
    fn url_parameters_are_taken_out() {
        let (rest, taken) = split(
            "postgres://u:p@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca%20dir%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@h/db?application_name=x");
        assert_eq!(
            taken,
            [
                ("sslmode".to_owned(), "verify-full".to_owned()),
                ("sslrootcert".to_owned(), "/ca dir/ca.pem".to_owned())
            ]
        );
        assert_eq!(split("postgres://h/db?sslmode=require").0, "postgres://h/db");
        assert_eq!(split("postgres://h/db").0, "postgres://h/db");
    }

    #[test]
    fn key_value_parameters_are_taken_out() {
        let (rest, taken) =
            split("host=h sslmode = verify-ca password='a b\\'c' sslrootcert='/my certs/ca.pem'");
        assert_eq!(rest, "host=h password='a b\\'c'");
        assert_eq!(
            taken,
            [
                ("sslmode".to_owned(), "verify-ca".to_owned()),
                ("sslrootcert".to_owned(), "/my certs/ca.pem".to_owned())
            ]
        );
        assert!(split_tls_parameters("host=h sslrootcert='open").is_err());
    }

    #[test]
    fn modes_follow_libpq() {
        let tls = |url: &str| DatabaseTls::from_url(&SecretUrl::new(url));
        let prefer = tls("postgres://u:secret@h/db").unwrap();
        assert_eq!(prefer.mode, SslMode::Prefer);
        assert_eq!(
            format!("{:?}", prefer.client),
            "encrypt without verifying the server"
        );
        assert_eq!(prefer.mode.driver_mode(), DriverMode::Prefer);
        let full = tls("postgres://h/db?sslmode=verify-full").unwrap();
        assert_eq!(full.mode.driver_mode(), DriverMode::Require);
        assert_eq!(
            format!("{:?}", full.client),
            "verify chain and host against bundled roots"
        );
        let ca = tls("host=h sslmode=verify-ca").unwrap();
        assert_eq!(
            format!("{:?}", ca.client),
            "verify chain (not host) against bundled roots"
        );
        let require = tls("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(
            format!("{:?}", require.client),
            "encrypt without verifying the server"
        );
        assert_eq!(
            tls("postgres://h/db?sslmode=disable").unwrap().mode.driver_mode(),
            DriverMode::Disable
        );
        let error = tls("postgres://u:secret@h/db?sslmode=allow").err().unwrap();
        assert!(
            error.contains("sslmode=allow") && !error.contains("secret"),
            "{error}"
        );
        let error = tls("postgres://h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let error = tls("postgres://h/db?sslcert=/c.pem").err().unwrap();
        assert!(error.contains("together"), "{error}");
    }
}
