//! A known password, given in every way the daemon takes one (URL, legacy
//! variable, `*_FILE`), through every mode (stdout, broker only, database
//! only, both, `--help`, failing starts): it never appears in stdout or
//! stderr. The broker runs use a wrong password on purpose, so that the
//! error paths (refused logins, retries) are looked at too; the database
//! accepts any password (trust), so its runs record for real, at debug
//! level.

use std::path::Path;

use crate::support::{database, write_file, Daemon, TestBroker, TestDatabase, DEADLINE};

const PASSWORD: &str = "Kn0wnPassw0rdForSecretsTest";

/// Fails the test if `text` (all output of one run) holds the password.
#[track_caller]
fn assert_no_password(mode: &str, text: &str) {
    assert!(!text.contains(PASSWORD), "{mode} printed the password:\n{text}");
}

/// The test database's URL, with the known password in it.
fn database_url_with_password() -> String {
    let url = database::url_at(&database::address().to_string());
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, host) = rest.split_once('@').expect("the URL names a user");
    let user = userinfo.split(':').next().expect("a user");
    format!("{scheme}://{user}:{PASSWORD}@{host}")
}

fn broker_url_with_password() -> String {
    "amqp://guest:".to_owned() + PASSWORD + "@127.0.0.1:5672/%2f"
}

/// Writes `content` into a file of its own (a mounted secret, with the
/// trailing newline such files usually have).
fn secret_file(directory: &Path, name: &str, content: &str) -> String {
    let path = directory.join(name);
    write_file(&path, format!("{content}\n"));
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

#[test]
fn a_known_password_is_never_printed_in_any_mode() {
    let secrets = tempfile::tempdir().expect("a directory for the secret files");
    let broker_url_file = secret_file(secrets.path(), "rabbitmq_url", &broker_url_with_password());
    let password_file = secret_file(secrets.path(), "rabbitmq_pass", PASSWORD);
    let database_url_file = secret_file(secrets.path(), "database_url", &database_url_with_password());

    // Stdout mode, with the password set but unused.
    let mut stdout_mode = Daemon::builder()
        .env("RABBITMQ_PASS", PASSWORD)
        .env("LOG_LEVEL", "debug")
        .start();
    write_file(&stdout_mode.path("stdout.flac"), b"stdout");
    stdout_mode.wait_for_event("created", &stdout_mode.path_str("stdout.flac"));
    stdout_mode.terminate();
    assert_no_password(
        "stdout mode",
        &(stdout_mode.stdout_text() + &stdout_mode.stderr_text()),
    );

    // Broker only, from RABBITMQ_URL_FILE, and from the legacy variables
    // with RABBITMQ_PASS_FILE: the login is refused, and retried.
    let broker = TestBroker::new();
    for (mode, builder) in [
        (
            "broker from RABBITMQ_URL_FILE",
            Daemon::builder()
                .env("RABBITMQ_URL_FILE", &broker_url_file)
                .env("LOG_LEVEL", "debug"),
        ),
        (
            "broker from RABBITMQ_PASS_FILE",
            Daemon::builder()
                .env("RABBITMQ_HOST", "127.0.0.1")
                .env("RABBITMQ_PASS_FILE", &password_file),
        ),
        (
            "broker from RABBITMQ_URL",
            // At trace level, lapin's and rustls' own records come out too.
            Daemon::builder()
                .env("RABBITMQ_URL", broker_url_with_password())
                .env("LOG_LEVEL", "trace"),
        ),
    ] {
        let mut daemon = builder.env("EXCHANGE", broker.exchange()).start();
        write_file(&daemon.path("broker.flac"), b"broker");
        daemon.wait_for_stderr("cannot publish now", DEADLINE);
        daemon.terminate();
        assert_no_password(mode, &(daemon.stdout_text() + &daemon.stderr_text()));
    }

    // Database only, from DATABASE_URL_FILE; then both, from the variables.
    let database = TestDatabase::new();
    let mut database_only = Daemon::builder()
        .env("DATABASE_URL_FILE", &database_url_file)
        .env("DB_SCHEMA", database.schema())
        .env("LOG_LEVEL", "debug")
        .start();
    write_file(&database_only.path("database.flac"), b"database");
    let path = database_only.path_str("database.flac");
    let message = database_only.wait_for_event("created", &path);
    database.wait_published(&path, message["message_id"].as_str().expect("a message id"));
    database_only.terminate();
    assert_no_password(
        "database only",
        &(database_only.stdout_text() + &database_only.stderr_text()),
    );

    let mut both = Daemon::builder()
        .env("RABBITMQ_URL", broker_url_with_password())
        .env("EXCHANGE", broker.exchange())
        .env("DATABASE_URL", database_url_with_password())
        .env("DB_SCHEMA", database.schema())
        .env("LOG_LEVEL", "debug")
        .start();
    write_file(&both.path("both.flac"), b"both");
    both.wait_for_stderr("cannot publish now", DEADLINE);
    both.terminate();
    assert_no_password("broker and database", &(both.stdout_text() + &both.stderr_text()));

    // --help, with every secret in the environment.
    let help = Daemon::builder()
        .arg("--help")
        .env("RABBITMQ_URL", broker_url_with_password())
        .env("RABBITMQ_PASS", PASSWORD)
        .env("DATABASE_URL", database_url_with_password())
        .run();
    assert!(
        help.stdout_text().contains("RABBITMQ_URL_FILE"),
        "{}",
        help.stdout_text()
    );
    assert_no_password("--help", &(help.stdout_text() + &help.stderr_text()));

    // Starts that fail on the configuration.
    for (mode, builder) in [
        (
            "RABBITMQ_URL and RABBITMQ_URL_FILE both set",
            Daemon::builder()
                .env("RABBITMQ_URL", broker_url_with_password())
                .env("RABBITMQ_URL_FILE", &broker_url_file),
        ),
        (
            "RABBITMQ_PASS and RABBITMQ_PASS_FILE both set",
            Daemon::builder()
                .env("RABBITMQ_HOST", "127.0.0.1")
                .env("RABBITMQ_PASS", PASSWORD)
                .env("RABBITMQ_PASS_FILE", &password_file),
        ),
        (
            "DATABASE_URL and DATABASE_URL_FILE both set",
            Daemon::builder()
                .env("DATABASE_URL", database_url_with_password())
                .env("DATABASE_URL_FILE", &database_url_file),
        ),
        (
            "a broker URL of the wrong scheme",
            Daemon::builder().env("RABBITMQ_URL", format!("http://guest:{PASSWORD}@127.0.0.1/")),
        ),
        (
            "a database URL with a bad sslmode",
            Daemon::builder().env(
                "DATABASE_URL",
                database_url_with_password() + "?sslmode=sometimes",
            ),
        ),
    ] {
        let finished = builder.run();
        let lines = finished.stderr_nonblank();
        assert_eq!(finished.status.code(), Some(2), "{mode}: {lines:?}");
        assert_eq!(lines.len(), 1, "{mode}: {lines:?}");
        assert_no_password(mode, &(finished.stdout_text() + &finished.stderr_text()));
    }
    let both_named = Daemon::builder()
        .env("DATABASE_URL", database_url_with_password())
        .env("DATABASE_URL_FILE", &database_url_file)
        .run();
    let line = both_named.stderr_text();
    assert!(
        line.contains("DATABASE_URL ") && line.contains("DATABASE_URL_FILE"),
        "{line}"
    );
}
