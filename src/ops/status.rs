//! `file-watcher status`: for cron and alerting. Exit 0 with one summary
//! line when all is well; exit 1 with one line per problem when an instance
//! is stale (not stopped, heartbeat too old) or has had messages pending for
//! longer than a threshold. Reads only the database.

use std::process::ExitCode;

use super::instances::Instance;
use super::OpsError;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// An instance whose last heartbeat is older than this many seconds,
    /// and that did not stop cleanly, is a problem.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    pub stale_after: u64,
    /// A message pending in the outbox for longer than this many seconds
    /// is a problem (the broker is down, or the publisher is stuck).
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    pub pending_after: u64,
}

pub fn run(config: &Config, args: &StatusArgs) -> Result<ExitCode, OpsError> {
    let instances = super::instances::read_all(config, args.stale_after)?;
    let problems = problems(&instances, args.pending_after as f64);
    if problems.is_empty() {
        let running = instances
            .iter()
            .filter(|instance| instance.state == "running")
            .count();
        println!(
            "ok: {running} running, {} stopped, none stale, nothing pending over {} s",
            instances.len() - running,
            args.pending_after
        );
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        println!("{problem}");
    }
    Ok(ExitCode::FAILURE)
}

/// One line per problem, in instance order.
pub fn problems(instances: &[Instance], pending_after: f64) -> Vec<String> {
    let mut problems = Vec::new();
    for instance in instances {
        let who = format!(
            "instance {} on {} ({})",
            instance.instance_id, instance.hostname, instance.watched_directory
        );
        if instance.state == "stale" {
            problems.push(format!(
                "{who}: stale, last heartbeat {:.0} s ago at {} (pid {}), not stopped cleanly",
                instance.heartbeat_age_seconds, instance.last_heartbeat, instance.pid
            ));
        }
        if let Some(oldest) = instance
            .oldest_pending_seconds
            .filter(|oldest| *oldest > pending_after)
        {
            problems.push(format!(
                "{who}: {} messages pending, the oldest for {oldest:.0} s (over {pending_after:.0} s)",
                instance.outbox_depth
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, state: &'static str, oldest: Option<f64>) -> Instance {
        Instance {
            instance_id: id.into(),
            hostname: "nas".into(),
            pid: 7,
            watched_directory: "/data/music".into(),
            version: "0.1.0".into(),
            state,
            started_at: "2026-01-01T00:00:00Z".into(),
            last_heartbeat: "2026-01-01T00:01:00Z".into(),
            heartbeat_age_seconds: 95.0,
            stopped_at: None,
            messages_recorded: 3,
            messages_confirmed: 3,
            outbox_depth: i64::from(oldest.is_some()) * 4,
            oldest_pending_seconds: oldest,
        }
    }

    #[test]
    fn stale_and_long_pending_are_problems_one_line_each() {
        let instances = [
            instance("a", "running", Some(10.0)),
            instance("b", "stale", None),
            instance("c", "stopped", Some(900.0)),
        ];
        let problems = problems(&instances, 300.0);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("instance b on nas (/data/music): stale"),
            "{}",
            problems[0]
        );
        assert!(problems[1].contains("instance c") && problems[1].contains("4 messages pending"));
    }
}
