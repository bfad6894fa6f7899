//! Deployment: the compose stacks as written, the stress script with five
//! instances, and the NAS service unit.
//!
//! The compose files are read two ways: by `docker-compose config -q` where
//! it is installed (compose's own validation, with `compose/.env.example`),
//! and always by a YAML reader here, which resolves the merge keys and the
//! `extends` the files use and checks what every watcher must have.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn compose_dir() -> PathBuf {
    Path::new(ROOT).join("compose")
}

fn load(file: &str) -> Yaml {
    let path = compose_dir().join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let mut documents = YamlLoader::load_from_str(&text).unwrap_or_else(|error| panic!("{file}: {error}"));
    assert_eq!(documents.len(), 1, "{file}: one document");
    resolve_merge_keys(documents.remove(0))
}

/// YAML merge keys (`<<: *anchor`): the mapping's own keys win.
fn resolve_merge_keys(node: Yaml) -> Yaml {
    match node {
        Yaml::Hash(hash) => {
            let merge_key = Yaml::String("<<".into());
            let mut own = yaml_rust2::yaml::Hash::new();
            let mut merged = None;
            for (key, value) in hash {
                let value = resolve_merge_keys(value);
                if key == merge_key {
                    merged = Some(value);
                } else {
                    own.insert(key, value);
                }
            }
            if let Some(Yaml::Hash(base)) = merged {
                for (key, value) in base {
                    own.entry(key).or_insert(value);
                }
            }
            Yaml::Hash(own)
        }
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(resolve_merge_keys).collect()),
        other => other,
    }
}

/// Compose's `extends`: the extending service's mappings are merged into the
/// extended one's key by key (so `environment` adds up); anything else it
/// sets replaces.
fn extend(base: &Yaml, child: &Yaml) -> Yaml {
    let (Yaml::Hash(base), Yaml::Hash(child)) = (base, child) else {
        return child.clone();
    };
    let mut result = base.clone();
    for (key, value) in child {
        if key.as_str() == Some("extends") {
            continue;
        }
        let merged = match (result.get(key), value) {
            (Some(old @ Yaml::Hash(_)), Yaml::Hash(_)) => extend(old, value),
            _ => value.clone(),
        };
        result.insert(key.clone(), merged);
    }
    Yaml::Hash(result)
}

/// The services of one stack as compose runs them: `extends` resolved,
/// only those active without a profile or with one of `profiles`.
fn services(file: &str, profiles: &[&str]) -> BTreeMap<String, Yaml> {
    let document = load(file);
    let mut services = BTreeMap::new();
    let Yaml::Hash(declared) = &document["services"] else {
        panic!("{file}: no services")
    };
    for (name, service) in declared {
        let name = name.as_str().expect("a service name").to_owned();
        let service = match &service["extends"] {
            Yaml::Hash(_) => {
                let from = service["extends"]["file"].as_str().expect("extends.file");
                let base_name = service["extends"]["service"].as_str().expect("extends.service");
                let base = load(from)["services"][base_name].clone();
                assert!(
                    !base.is_badvalue(),
                    "{file}: {name} extends a missing {from}:{base_name}"
                );
                assert!(
                    base["depends_on"].is_badvalue(),
                    "{from}:{base_name}: compose cannot extend a service with depends_on"
                );
                extend(&base, service)
            }
            _ => service.clone(),
        };
        let active = match &service["profiles"] {
            Yaml::Array(wanted) => wanted
                .iter()
                .any(|profile| profiles.contains(&profile.as_str().unwrap_or_default())),
            _ => true,
        };
        if active {
            services.insert(name, service);
        }
    }
    services
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks what every watcher must have and returns (instance id, data dir).
fn check_watcher(file: &str, name: &str, service: &Yaml) -> (String, String) {
    let context = format!("{file}: {name}");
    assert_eq!(service["image"].as_str(), Some("file-watcher:local"), "{context}");
    assert_eq!(service["restart"].as_str(), Some("unless-stopped"), "{context}");
    assert_eq!(service["read_only"].as_bool(), Some(true), "{context}");
    assert_eq!(strings(&service["cap_drop"]), ["ALL"], "{context}");
    assert!(
        strings(&service["security_opt"]).contains(&"no-new-privileges:true".to_owned()),
        "{context}"
    );
    assert_eq!(
        service["user"].as_str(),
        Some("${PUID:-1000}:${PGID:-1000}"),
        "{context}: non-root from .env"
    );
    assert_eq!(
        strings(&service["healthcheck"]["test"]),
        ["CMD", "/file-watcher", "healthcheck"],
        "{context}: the binary's own healthcheck, no shell"
    );
    let environment = &service["environment"];
    let instance = environment["INSTANCE_ID"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: INSTANCE_ID"));
    let data_dir = environment["DATA_DIR"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: DATA_DIR"));
    for variable in ["RABBITMQ_URL", "DATABASE_URL", "METRICS_ADDR", "EXCHANGE"] {
        assert!(environment[variable].as_str().is_some(), "{context}: {variable}");
    }
    let volumes = strings(&service["volumes"]);
    assert_eq!(volumes.len(), 1, "{context}: one tree");
    assert!(
        volumes[0].ends_with(&format!(":{data_dir}:ro")) && volumes[0].starts_with("${"),
        "{context}: the tree from .env, read-only at DATA_DIR: {volumes:?}"
    );
    (instance.to_owned(), data_dir.to_owned())
}

fn watchers(services: &BTreeMap<String, Yaml>) -> Vec<&String> {
    services
        .keys()
        .filter(|name| name.starts_with("watcher-"))
        .collect()
}

#[test]
fn the_bundled_stack_brings_its_broker_and_database_and_hardened_watchers() {
    for (profiles, expected) in [
        (&[][..], &["music", "downloads", "imports"][..]),
        (
            &["extended"][..],
            &["music", "downloads", "imports", "podcasts", "audiobooks"][..],
        ),
    ] {
        let services = services("docker-compose.yml", profiles);
        let rabbitmq = &services["rabbitmq"];
        assert!(rabbitmq["image"].as_str().unwrap().contains("management"));
        assert!(strings(&rabbitmq["volumes"])
            .iter()
            .any(|volume| volume.starts_with("./rabbitmq/definitions.json:")));
        assert!(!rabbitmq["healthcheck"]["test"].is_badvalue());
        assert!(services["postgres"]["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres"));
        assert!(!services["postgres"]["healthcheck"]["test"].is_badvalue());

        let mut instances = Vec::new();
        for name in watchers(&services) {
            let service = &services[name];
            let (instance, _) = check_watcher("docker-compose.yml", name, service);
            for server in ["rabbitmq", "postgres"] {
                assert_eq!(
                    service["depends_on"][server]["condition"].as_str(),
                    Some("service_healthy"),
                    "{name} waits for a healthy {server}"
                );
            }
            assert!(service["environment"]["RABBITMQ_URL"]
                .as_str()
                .unwrap()
                .contains("@rabbitmq:5672"));
            instances.push(instance);
        }
        assert_eq!(instances.len(), expected.len(), "{profiles:?}: {instances:?}");
        for id in expected {
            assert!(
                instances.iter().any(|instance| instance == id),
                "{profiles:?}: {id}"
            );
        }
    }
}

#[test]
fn the_host_stack_runs_the_same_watchers_on_the_host_network() {
    for (profiles, count) in [(&[][..], 3), (&["extended"][..], 5)] {
        let services = services("docker-compose.host.yml", profiles);
        assert!(!services.contains_key("rabbitmq") && !services.contains_key("postgres"));
        let mut ports = Vec::new();
        let mut instances = Vec::new();
        for name in watchers(&services) {
            let service = &services[name];
            let (instance, _) = check_watcher("docker-compose.host.yml", name, service);
            assert_eq!(service["network_mode"].as_str(), Some("host"), "{name}");
            assert!(
                service["depends_on"].is_badvalue(),
                "{name}: no bundled servers to wait for"
            );
            let metrics = service["environment"]["METRICS_ADDR"].as_str().unwrap();
            assert!(metrics.starts_with("127.0.0.1:${"), "{name}: {metrics}");
            ports.push(metrics.to_owned());
            instances.push(instance);
        }
        assert_eq!(instances.len(), count, "{profiles:?}");
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), count, "one METRICS_ADDR port each: {ports:?}");
    }
}

#[test]
fn every_variable_the_stacks_use_is_in_the_env_example() {
    let example = std::fs::read_to_string(compose_dir().join(".env.example")).unwrap();
    let defined: Vec<&str> = example
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    for file in ["docker-compose.yml", "docker-compose.host.yml", "watchers.yml"] {
        let text = std::fs::read_to_string(compose_dir().join(file)).unwrap();
        for (_, rest) in text.match_indices("${").map(|(at, _)| text.split_at(at + 2)) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                defined.contains(&name.as_str()),
                "{file} uses {name}, which .env.example lacks"
            );
        }
    }
}

/// compose's own check, where docker-compose is installed.
#[test]
fn docker_compose_accepts_both_stacks_with_and_without_the_extended_profile() {
    if Command::new("docker-compose").arg("version").output().is_err() {
        eprintln!("docker-compose is not installed: the YAML tests above stand in for it");
        return;
    }
    for file in ["docker-compose.yml", "docker-compose.host.yml"] {
        for profile in [&[][..], &["--profile", "extended"][..]] {
            let output = Command::new("docker-compose")
                .current_dir(compose_dir())
                .args(["--env-file", ".env.example", "-f", file])
                .args(profile)
                .args(["config", "-q"])
                .output()
                .expect("run docker-compose");
            assert!(
                output.status.success(),
                "docker-compose -f {file} {profile:?} config -q: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn the_service_unit_is_hardened_and_verifies() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("scripts/file-watcher@.service")).unwrap();
    for line in [
        "Type=notify",
        "EnvironmentFile=/etc/file-watcher/%i.env",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "WatchdogSec=60",
    ] {
        assert!(unit.lines().any(|own| own == line), "missing {line}");
    }
    assert!(unit.lines().any(|line| line.starts_with("ReadOnlyPaths=")));
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: checked the unit's lines only");
        return;
    }
    // Verified as an instance, with the binary under test in ExecStart.
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_file-watcher");
    std::fs::write(
        dir.path().join("file-watcher@.service"),
        unit.replace("/usr/local/bin/file-watcher", binary),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .current_dir(dir.path())
        .args(["verify", "./file-watcher@music.service"])
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// `scripts/stress.sh --instances 5 --files 200`, with the binaries of this
/// build: five instances, every kind of change, one killed and restarted.
#[test]
fn stress_five_instances_two_hundred_files() {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_file-watcher"));
    let mut command = Command::new(Path::new(ROOT).join("scripts/stress.sh"));
    command.args(["--instances", "5", "--files", "200"]);
    // scripts/test.sh builds the judge before the tests; without it the
    // script makes a release build of its own (minutes, beside the suite).
    let checker = binary.with_file_name("examples").join("chaos_check");
    if checker.is_file() {
        command
            .arg("--binary")
            .arg(&binary)
            .arg("--checker")
            .arg(&checker);
    }
    let output = command.output().expect("run scripts/stress.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scripts/stress.sh failed:\n{stdout}\n{stderr}"
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("stress-"))
        .collect();
    // Five in the judgement table, five in the traffic table.
    assert_eq!(rows.len(), 10, "{stdout}");
    for row in &rows[..5] {
        let numbers: Vec<u64> = row
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        let [expected, recorded, published, lost, _duplicated, unpublished, wrong_instance, double] =
            numbers[..]
        else {
            panic!("{row}")
        };
        // 200 written, a tenth deleted, 50 in the burst, 3 slow, 1 shared.
        assert_eq!(expected, 200 - 20 + 50 + 3 + 1, "{row}");
        assert_eq!(
            (recorded, published, lost, unpublished, wrong_instance, double),
            (expected, expected, 0, 0, 0, 0),
            "{row}"
        );
    }
    let by_type = stdout
        .lines()
        .find(|line| line.starts_with("events by type"))
        .unwrap_or_else(|| panic!("{stdout}"));
    for kind in ["created", "deleted", "renamed", "moved"] {
        assert!(by_type.contains(kind), "{by_type}");
    }
}

/// Under a `Type=notify` unit: `READY=1` once caught up, `WATCHDOG=1` at
/// half the watchdog interval while alive, `STOPPING=1` on the way out. A
/// datagram socket of the test's own stands in for systemd.
#[test]
fn the_daemon_tells_systemd_it_is_ready_and_pets_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut daemon = crate::support::Daemon::builder()
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .env("WATCHDOG_USEC", "1000000")
        .file("before.flac", "x")
        .start();
    let mut received: Vec<String> = Vec::new();
    let read_until = |wanted: &str, received: &mut Vec<String>| {
        let deadline = Instant::now() + crate::support::DEADLINE;
        let mut buffer = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(length) = socket.recv(&mut buffer) {
                received.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
                if received
                    .iter()
                    .filter(|datagram| datagram.contains(wanted))
                    .count()
                    >= 2
                    || (wanted != "WATCHDOG=1" && received.iter().any(|datagram| datagram.contains(wanted)))
                {
                    return;
                }
            }
        }
        panic!("no {wanted} from the daemon; got {received:?}");
    };
    read_until("READY=1", &mut received);
    // Two pets at 0.5 s intervals.
    read_until("WATCHDOG=1", &mut received);
    assert!(daemon.terminate().success());
    read_until("STOPPING=1", &mut received);
    let ready = received
        .iter()
        .position(|datagram| datagram.contains("READY=1"))
        .unwrap();
    let stopping = received
        .iter()
        .position(|datagram| datagram.contains("STOPPING=1"))
        .unwrap();
    assert!(ready < stopping, "{received:?}");
}
