//! `file-watcher healthcheck`: the container healthcheck. Asks `/healthz`
//! of the instance at `METRICS_ADDR` over plain HTTP/1.0 on a
//! `std::net::TcpStream`: no shell, no files, no DNS (the address is an IP
//! literal), so it works in a scratch image with a read-only root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use super::OpsError;
use crate::config::Config;

/// Bounds connecting, sending and reading the answer, each.
const TIMEOUT: Duration = Duration::from_secs(3);

pub fn run(config: &Config) -> Result<ExitCode, OpsError> {
    let Some(address) = config.metrics_addr else {
        println!("unhealthy: METRICS_ADDR is not set, so there is no /healthz to ask");
        return Ok(ExitCode::FAILURE);
    };
    match ask(address, "/healthz") {
        Ok((200, body)) => {
            println!("healthy: {}", first_line(&body));
            Ok(ExitCode::SUCCESS)
        }
        Ok((status, body)) => {
            println!(
                "unhealthy: /healthz at {address} answered {status}: {}",
                first_line(&body)
            );
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            println!("unhealthy: cannot ask /healthz at METRICS_ADDR {address}: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// GETs `path` at `address`: the status code and the body.
pub fn ask(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse(&String::from_utf8_lossy(&response))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}

/// The status code and body of an HTTP/1.x response.
fn parse(response: &str) -> Option<(u16, String)> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn first_line(body: &str) -> &str {
    body.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_status_and_body() {
        let answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nnot alive: x\n";
        assert_eq!(parse(answer), Some((503, "not alive: x\n".into())));
        assert_eq!(parse("garbage"), None);
    }
}
