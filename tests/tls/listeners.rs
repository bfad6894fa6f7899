//! TLS listeners in front of the shared RabbitMQ and PostgreSQL, for
//! `scripts/tls-check.sh`: the same listeners and certificates the
//! end-to-end tests use (`tests/support/tls.rs`), as a tool a script can run
//! beside a binary of any build (the static musl one).
//!
//! Prints the settings a daemon needs, as `NAME=value` lines, then serves
//! until its standard input closes, and ends with the number of TLS
//! handshakes each listener completed.
//!
//! The shared servers are read from `RABBITMQ_TEST_URL` / `DATABASE_TEST_URL`
//! host and port (defaults 127.0.0.1:5672 and 127.0.0.1:5432); the database
//! URL it prints uses user `postgres` and database `test` unless
//! `TLS_CHECK_DATABASE` names another `user@database`.

#[path = "../support/tls.rs"]
#[allow(dead_code)]
mod tls;

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};

use tls::{Pki, Protocol, TlsProxy};

fn address(variable: &str, default: &str) -> SocketAddr {
    let url = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let authority = authority.split(['/', '?']).next().unwrap_or(authority);
    authority
        .to_socket_addrs()
        .unwrap_or_else(|error| panic!("{variable}: {authority}: {error}"))
        .next()
        .unwrap_or_else(|| panic!("{variable}: {authority} has no address"))
}

fn main() {
    let broker = address("RABBITMQ_TEST_URL", "amqp://127.0.0.1:5672/%2f");
    let database = address("DATABASE_TEST_URL", "postgres://127.0.0.1:5432/test");
    let who = std::env::var("TLS_CHECK_DATABASE").unwrap_or_else(|_| "postgres@test".to_owned());
    let (user, name) = who.split_once('@').expect("TLS_CHECK_DATABASE is user@database");
    let pki = Pki::new();
    let server = pki.files("server");
    let broker_tls = TlsProxy::start(broker, Protocol::Amqps, &server, None);
    let database_tls = TlsProxy::start(database, Protocol::Postgres, &server, None);
    let ca = pki.ca_file();
    let ca = ca.display();
    println!(
        "RABBITMQ_URL=amqps://guest:guest@localhost:{}/%2f",
        broker_tls.port()
    );
    println!("RABBITMQ_CA_FILE={ca}");
    println!(
        "DATABASE_URL=postgres://{user}@localhost:{}/{name}?sslmode=verify-full&sslrootcert={ca}",
        database_tls.port()
    );
    println!("READY");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    println!("broker TLS handshakes: {}", broker_tls.handshakes());
    println!("database TLS handshakes: {}", database_tls.handshakes());
}
