//! The real `file-watcher`, one process per instance: started with a cleared
//! environment plus exactly what the scenario sets, its stderr kept in a log
//! file and watched for the lines that say where it is, its stdout (stdout
//! mode) read into [`Arrivals`], its memory read from `/proc`.
//!
//! Stopping is SIGTERM (as an operator would), then SIGKILL if the process
//! has not exited within [`STOP`]; dropping a `Daemon` that was not stopped
//! kills it. Either way both reader threads are joined.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::arrivals::{Arrivals, Watched};
use crate::Deadline;

/// How long a stopping daemon may take before it is killed: its own final
/// drain is 5 s.
const STOP: Duration = Duration::from_secs(30);

/// Where a daemon with both sinks sends its work.
pub struct Sinks {
    pub database_url: String,
    pub schema: String,
    pub rabbitmq_url: String,
    pub exchange: String,
}

/// How to start one instance.
pub struct Setup<'a> {
    pub binary: &'a Path,
    pub tree: &'a Path,
    pub instance_id: String,
    pub settle_ms: u64,
    /// Both sinks; `None` is stdout mode, whose announcements go to `announcements`.
    pub sinks: Option<&'a Sinks>,
    pub env: &'a [(String, String)],
    /// Where stderr is kept.
    pub log: PathBuf,
}

/// What the daemon's stderr has said so far.
#[derive(Default)]
struct Log {
    /// `ready: watching …`: the watches are in place.
    ready: bool,
    /// When `catch-up complete` first appeared (start-up scan and sweep done).
    caught_up: Option<Instant>,
    /// `rescanning` warnings: the kernel's (or the daemon's) event queue overflowed.
    rescans: usize,
    /// stderr closed: the process is exiting.
    closed: bool,
    /// The last lines, for error messages.
    tail: VecDeque<String>,
}

const TAIL_LINES: usize = 20;

pub struct Daemon {
    name: String,
    child: Child,
    log: Arc<Watched<Log>>,
    readers: Vec<JoinHandle<()>>,
    stopped: bool,
}

/// Resident memory, in KiB, as `/proc/<pid>/status` gives it.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// VmRSS: resident now.
    pub resident: u64,
    /// VmHWM: the peak so far.
    pub peak: u64,
}

impl Daemon {
    /// Starts the daemon; in stdout mode its announcements are recorded in
    /// `announcements` (which must then be `Some`).
    pub fn start(setup: &Setup<'_>, announcements: Option<Arc<Watched<Arrivals>>>) -> Result<Daemon, String> {
        let name = setup.instance_id.clone();
        let mut command = Command::new(setup.binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATA_DIR", setup.tree)
            .env("INSTANCE_ID", &setup.instance_id)
            .env("SETTLE_MS", setup.settle_ms.to_string())
            .env("LOG_LEVEL", "info");
        if let Some(sinks) = setup.sinks {
            command
                .env("DATABASE_URL", &sinks.database_url)
                .env("DB_SCHEMA", &sinks.schema)
                .env("RABBITMQ_URL", &sinks.rabbitmq_url)
                .env("EXCHANGE", &sinks.exchange);
        }
        command.envs(setup.env.iter().map(|(name, value)| (name, value)));
        let stdout = if announcements.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("start {}: {error}", setup.binary.display()))?;
        let log = Arc::new(Watched::new(Log::default()));
        let mut readers = Vec::new();
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_file =
            File::create(&setup.log).map_err(|error| format!("create {}: {error}", setup.log.display()))?;
        let shared = Arc::clone(&log);
        readers.push(spawn_reader(&format!("stderr-{name}"), move || {
            read_stderr(stderr, log_file, &shared)
        })?);
        if let Some(announcements) = announcements {
            let stdout = child.stdout.take().expect("stdout is piped");
            readers.push(spawn_reader(&format!("stdout-{name}"), move || {
                read_stdout(stdout, &announcements)
            })?);
        }
        Ok(Daemon {
            name,
            child,
            log,
            readers,
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `ready:` and, if `catch_up`, for `catch-up complete` too
    /// (with a database: the start-up reconciliation is done).
    pub fn wait_ready(&self, catch_up: bool, deadline: Deadline) -> Result<(), String> {
        let done = self.log.wait_until(deadline, |log| {
            log.closed || (log.ready && (!catch_up || log.caught_up.is_some()))
        });
        let (ready, closed) = self.log.read(|log| (log.ready, log.closed));
        if done && !closed {
            return Ok(());
        }
        let what = if !ready { "ready" } else { "catch-up complete" };
        let why = if closed {
            "it exited"
        } else {
            "the deadline passed"
        };
        Err(format!(
            "{}: no {what:?} ({why}); its last lines:\n{}",
            self.name,
            self.tail()
        ))
    }

    /// When `catch-up complete` appeared, if it has.
    pub fn caught_up_at(&self) -> Option<Instant> {
        self.log.read(|log| log.caught_up)
    }

    /// `rescanning` warnings so far.
    pub fn rescans(&self) -> usize {
        self.log.read(|log| log.rescans)
    }

    /// The last lines of stderr, for error messages.
    pub fn tail(&self) -> String {
        self.log
            .read(|log| log.tail.iter().cloned().collect::<Vec<_>>().join("\n"))
    }

    pub fn memory(&self) -> Result<Memory, String> {
        memory_of(self.pid()).map_err(|error| format!("{}: {error}", self.name))
    }

    /// CPU time used so far, in clock ticks (user + system).
    pub fn cpu_ticks(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).map_err(|error| format!("read {path}: {error}"))?;
        // The command name (field 2) may hold spaces: count fields after its ')'.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<u64>().ok());
        match (ticks(11), ticks(12)) {
            (Some(user), Some(system)) => Ok(user + system),
            _ => Err(format!("{path}: unexpected layout")),
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP`]; joins the readers. Fails if the
    /// daemon had to be killed or exited with an error.
    pub fn stop(mut self) -> Result<(), String> {
        self.stopped = true;
        let terminated = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .map_err(|error| format!("run kill: {error}"))?;
        let deadline = Instant::now() + STOP;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) | Err(_) => break None,
            }
        };
        let result = match status {
            Some(status) if status.success() || !terminated.success() => Ok(()),
            Some(status) => Err(format!(
                "{} exited with {status}; its last lines:\n{}",
                self.name,
                self.tail()
            )),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(format!(
                    "{} did not stop within {STOP:?} of SIGTERM: killed",
                    self.name
                ))
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        result
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            for reader in self.readers.drain(..) {
                let _ = reader.join();
            }
        }
    }
}

/// Clock ticks per second, the unit of [`Daemon::cpu_ticks`] (`getconf
/// CLK_TCK`; 100 on Linux when that cannot be asked).
pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

/// CPU time the daemons have used so far, in seconds.
pub fn cpu_seconds(daemons: &[Daemon]) -> Result<f64, String> {
    let mut ticks = 0;
    for daemon in daemons {
        ticks += daemon.cpu_ticks()?;
    }
    Ok(ticks as f64 / ticks_per_second())
}

/// VmRSS and VmHWM of a process.
pub fn memory_of(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|error| format!("read {path}: {error}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no {name}"))
    };
    Ok(Memory {
        resident: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

fn spawn_reader(name: &str, read: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(read)
        .map_err(|error| format!("start thread {name}: {error}"))
}

fn read_stderr(stderr: impl std::io::Read, mut file: File, log: &Watched<Log>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        // The log file is for a person reading after a failure; losing it must not stop the reading.
        let _ = writeln!(file, "{line}");
        log.update(|log| {
            log.ready |= line.contains("ready: watching");
            if line.contains("catch-up complete") && log.caught_up.is_none() {
                log.caught_up = Some(Instant::now());
            }
            log.rescans += usize::from(line.contains("rescanning"));
            if log.tail.len() == TAIL_LINES {
                log.tail.pop_front();
            }
            log.tail.push_back(line);
        });
    }
    log.update(|log| log.closed = true);
}

fn read_stdout(stdout: impl std::io::Read, announcements: &Watched<Arrivals>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let at = Instant::now();
                announcements.update(|arrivals| arrivals.record(&line, at));
            }
        }
    }
}
