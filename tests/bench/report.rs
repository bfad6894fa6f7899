//! The report: the median of every figure over the runs, printed as a table
//! that puts each figure beside its ceiling (measured in the same run) or
//! its target (issue 9), and written as JSON:
//!
//! ```json
//! {"meta": {"runs": "3", "settle_ms": "100", ...},
//!  "figures": {"throughput_events_per_s": 812.0, ...},
//!  "runs": [{"run": 1, "figures": {...}}, ...]}
//! ```
//!
//! `figures` holds the medians; `runs` each run's own values. BENCHMARKS.md
//! lists the names and what each measures.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::stats::median;
use crate::Figures;

pub fn run(results: &Path, json: &Path, meta: &[String]) -> Result<(), String> {
    let text =
        std::fs::read_to_string(results).map_err(|error| format!("read {}: {error}", results.display()))?;
    let mut runs: BTreeMap<u64, Figures> = BTreeMap::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
    {
        let record: Value = serde_json::from_str(line)
            .map_err(|error| format!("{} line {}: {error}", results.display(), number + 1))?;
        let run = record["run"].as_u64().unwrap_or(0);
        let figures = record["figures"].as_object().cloned().unwrap_or_default();
        let into = runs.entry(run).or_default();
        for (name, value) in figures {
            into.insert(name, value.as_f64().unwrap_or(f64::NAN));
        }
    }
    let mut values: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for figures in runs.values() {
        for (name, value) in figures {
            values.entry(name).or_default().push(*value);
        }
    }
    let medians: Figures = values
        .into_iter()
        .filter_map(|(name, values)| median(&values).map(|value| (name.to_owned(), value)))
        .collect();
    let meta: BTreeMap<String, String> = meta
        .iter()
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();

    print!("{}", table(&medians, &meta));
    let document = serde_json::json!({
        "meta": meta,
        "figures": medians,
        "runs": runs
            .iter()
            .map(|(run, figures)| serde_json::json!({ "run": run, "figures": figures }))
            .collect::<Vec<_>>(),
    });
    if let Some(parent) = json.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|error| format!("create {}: {error}", parent.display()))?;
    }
    let pretty = serde_json::to_string_pretty(&document).expect("a JSON value serializes");
    std::fs::write(json, pretty + "\n").map_err(|error| format!("write {}: {error}", json.display()))?;
    println!("JSON: {}", json.display());
    Ok(())
}

/// One line of the table.
struct Row {
    figure: String,
    value: String,
    /// The ceiling or reference it is read against, and the ratio to it.
    beside: String,
    target: String,
}

fn table(figures: &Figures, meta: &BTreeMap<String, String>) -> String {
    let get = |name: &str| figures.get(name).copied().filter(|value| value.is_finite());
    let meta_number = |name: &str| meta.get(name).and_then(|value| value.parse::<f64>().ok());
    let meta_text = |name: &str, default: &str| meta.get(name).cloned().unwrap_or_else(|| default.to_owned());
    let settle = meta_number("settle_ms").unwrap_or(100.0);
    let broker = get("ceiling_broker_msgs_per_s");
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |figure: String, value: Option<String>, beside: String, target: &str| {
        if let Some(value) = value {
            rows.push(Row {
                figure,
                value,
                beside,
                target: target.to_owned(),
            });
        }
    };
    let of_broker = |value: Option<f64>| match (value, broker) {
        (Some(value), Some(ceiling)) => format!("{} of the broker's ceiling", percent(value / ceiling)),
        _ => String::new(),
    };

    push(
        format!(
            "broker ceiling: raw publisher, persistent, window {}",
            meta_text("window", "?")
        ),
        broker.map(|value| format!("{} msg/s", whole(value))),
        match (
            get("ceiling_broker_body_bytes"),
            get("ceiling_broker_consumed_msgs_per_s"),
        ) {
            (Some(bytes), Some(consumed)) => {
                format!("bodies of {} B; read at {} msg/s", whole(bytes), whole(consumed))
            }
            _ => String::new(),
        },
        "",
    );
    push(
        "PostgreSQL ceiling: multi-row upsert + outbox, 500/tx".into(),
        get("ceiling_postgres_files_per_s").map(|value| format!("{} files/s", whole(value))),
        String::new(),
        "",
    );
    let throughput = get("throughput_events_per_s");
    push(
        format!(
            "throughput: {} instances × {} files of {} KiB",
            meta_text("instances", "?"),
            meta_text("files", "?"),
            meta_text("size_kib", "?")
        ),
        throughput.map(|value| format!("{} ev/s", whole(value))),
        of_broker(throughput),
        "≥ 10,000 ev/s, ≥ 70 % of ceiling",
    );
    push(
        "  latency p50 / p99, last write → on the queue".into(),
        pair(
            get("throughput_latency_p50_ms"),
            get("throughput_latency_p99_ms"),
            "ms",
        ),
        format!("settle {} ms", whole(settle)),
        "",
    );
    push(
        "  writers".into(),
        get("throughput_writer_files_per_s").map(|value| format!("{} files/s", whole(value))),
        ratio_text(
            get("throughput_writer_files_per_s"),
            throughput,
            "the daemons' rate",
        ),
        "> 1× (writers not the bottleneck)",
    );
    push(
        "  daemons' CPU per event: throughput / import large".into(),
        pair(
            get("throughput_cpu_us_per_event"),
            get("import_large_cpu_us_per_event"),
            "µs",
        ),
        match (get("throughput_cpu_us_per_event"), throughput) {
            (Some(cost), Some(rate)) => format!("{:.2} cores busy during throughput", cost * rate / 1e6),
            _ => String::new(),
        },
        "",
    );
    let variant = get("variant_events_per_s");
    push(
        format!("  variant: {}", meta_text("variant", "")),
        variant.map(|value| format!("{} ev/s", whole(value))),
        ratio_text(variant, throughput, "throughput"),
        "",
    );
    push(
        format!(
            "paced: {} files/s per instance × {}, latency p50 / p99",
            meta_text("paced_rate", "?"),
            meta_text("instances", "?")
        ),
        pair(get("paced_latency_p50_ms"), get("paced_latency_p99_ms"), "ms"),
        format!("settle + 25 = {} ms", whole(settle + 25.0)),
        "p99 ≤ settle + 25 ms",
    );
    for (label, count) in [("import_small", "import_small"), ("import_large", "import_large")] {
        let rate = get(&format!("{label}_files_per_s"));
        push(
            format!(
                "bulk import: {} files moved in, 1 instance",
                meta_text(count, "?")
            ),
            rate.map(|value| format!("{} files/s", whole(value))),
            of_broker(rate),
            "≥ 4,000 files/s",
        );
    }
    let cost = match (get("import_large_us_per_file"), get("import_small_us_per_file")) {
        (Some(large), Some(small)) if small > 0.0 => Some(large / small),
        _ => None,
    };
    push(
        "  cost per file, large ÷ small".into(),
        cost.map(|value| format!("{value:.2}×")),
        pair(
            get("import_small_us_per_file"),
            get("import_large_us_per_file"),
            "µs/file",
        )
        .unwrap_or_default(),
        "≤ 1.5×",
    );
    push(
        format!(
            "catch-up: restart over {} unchanged files",
            meta_text("import_large", "?")
        ),
        get("catchup_unchanged_s").map(|value| format!("{value:.2} s")),
        String::new(),
        "≤ 5 s",
    );
    push(
        "catch-up: restart with 1 % changed".into(),
        get("catchup_changed_s").map(|value| format!("{value:.2} s")),
        String::new(),
        "≤ 10 s",
    );
    push(
        format!(
            "stdout burst: {} files into a new dir, last write → last line",
            meta_text("burst", "?")
        ),
        get("burst_tail_s").map(|value| format!("{value:.2} s")),
        get("burst_writer_files_per_s")
            .map(|value| format!("written at {} files/s", whole(value)))
            .unwrap_or_default(),
        "≤ 2 s",
    );
    push(
        "idle RSS, both sinks / stdout mode".into(),
        pair(
            get("throughput_idle_rss_kib").map(mib),
            get("memory_idle_rss_kib").map(mib),
            "MiB",
        ),
        String::new(),
        "≤ 10 MiB",
    );
    push(
        "peak RSS: throughput / paced".into(),
        pair(
            get("throughput_peak_rss_kib").map(mib),
            get("paced_peak_rss_kib").map(mib),
            "MiB",
        ),
        String::new(),
        "≤ 40 MiB",
    );
    push(
        "peak RSS: import small / large".into(),
        pair(
            get("import_small_peak_rss_kib").map(mib),
            get("import_large_peak_rss_kib").map(mib),
            "MiB",
        ),
        String::new(),
        "",
    );
    push(
        "peak RSS: stdout burst / hashing".into(),
        pair(
            get("burst_peak_rss_kib").map(mib),
            get("hash_peak_rss_kib").map(mib),
            "MiB",
        ),
        String::new(),
        "",
    );
    push(
        format!(
            "steady: {} events on {} files, RSS warm → end",
            meta_text("steady_events", "?"),
            meta_text("steady_files", "?")
        ),
        pair(
            get("steady_rss_warm_kib").map(mib),
            get("steady_rss_end_kib").map(mib),
            "MiB",
        ),
        match (get("steady_rss_growth_kib"), get("steady_events_per_s")) {
            (Some(growth), Some(rate)) => format!("growth {} KiB; at {} ev/s", whole(growth), whole(rate)),
            _ => String::new(),
        },
        "flat",
    );
    push(
        format!("memory per pending path ({} files)", meta_text("pending", "?")),
        get("memory_bytes_per_pending_path").map(|value| format!("{} B", whole(value))),
        String::new(),
        "≤ 300 B (aim)",
    );
    push(
        format!(
            "memory per watched directory ({} dirs)",
            meta_text("directories", "?")
        ),
        get("memory_bytes_per_directory").map(|value| format!("{} B", whole(value))),
        String::new(),
        "",
    );
    let hashing = get("hash_daemon_mb_per_s");
    let sha256sum = get("ceiling_sha256sum_mb_per_s");
    push(
        format!(
            "hashing: {} MiB file, daemon (SHA-256 + XXH3)",
            meta_text("big_mib", "?")
        ),
        hashing.map(|value| format!("{} MB/s", whole(value))),
        match (hashing, sha256sum) {
            (Some(daemon), Some(reference)) => {
                format!(
                    "{} of sha256sum's {} MB/s",
                    percent(daemon / reference),
                    whole(reference)
                )
            }
            _ => String::new(),
        },
        "≥ 90 % of sha256sum",
    );
    let openssl = get("ceiling_openssl_sha256_mb_per_s");
    push(
        "  openssl dgst -sha256, same file".into(),
        openssl.map(|value| format!("{} MB/s", whole(value))),
        match (hashing, openssl) {
            (Some(daemon), Some(reference)) => format!("daemon at {} of it", percent(daemon / reference)),
            _ => String::new(),
        },
        "",
    );
    let labels = ["throughput", "paced", "import_small", "import_large", "burst"];
    let rescans: Vec<(&str, f64)> = labels
        .iter()
        .filter_map(|label| get(&format!("{label}_rescans")).map(|count| (*label, count)))
        .collect();
    push(
        "rescans (event queue overflows)".into(),
        (!rescans.is_empty()).then(|| whole(rescans.iter().map(|(_, count)| count).sum())),
        // Only where there were any: a row of zeros would only widen the table.
        rescans
            .iter()
            .filter(|(_, count)| *count > 0.0)
            .map(|(label, count)| format!("{label} {}", whole(*count)))
            .collect::<Vec<_>>()
            .join(", "),
        "",
    );

    let widths = rows.iter().fold([6, 6, 6, 6], |widths, row| {
        [
            widths[0].max(row.figure.chars().count()),
            widths[1].max(row.value.chars().count()),
            widths[2].max(row.beside.chars().count()),
            widths[3].max(row.target.chars().count()),
        ]
    });
    let mut out = String::new();
    let line = |figure: &str, value: &str, beside: &str, target: &str| {
        let pad = |text: &str, width: usize| format!("{text}{}", " ".repeat(width - text.chars().count()));
        format!(
            "{}  {}  {}  {}\n",
            pad(figure, widths[0]),
            " ".repeat(widths[1] - value.chars().count()) + value,
            pad(beside, widths[2]),
            target
        )
        .trim_end()
        .to_owned()
            + "\n"
    };
    out.push_str(&format!(
        "medians of {} run(s); binary: {}; load average at start: {}\n",
        meta_text("runs", "?"),
        meta_text("binary", "?"),
        meta_text("loadavg", "?")
    ));
    out.push_str(&line("figure", "median", "beside", "target (issue 9)"));
    for row in &rows {
        out.push_str(&line(&row.figure, &row.value, &row.beside, &row.target));
    }
    out
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

/// `1,234`, or `12.3` below 100 (where the decimal matters).
fn whole(value: f64) -> String {
    if value.abs() < 100.0 && value.fract() != 0.0 {
        return format!("{value:.1}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        grouped.insert(0, '-');
    }
    grouped
}

fn percent(ratio: f64) -> String {
    format!("{:.1} %", ratio * 100.0)
}

fn pair(first: Option<f64>, second: Option<f64>, unit: &str) -> Option<String> {
    let show = |value: Option<f64>| value.map_or("–".to_owned(), whole);
    (first.is_some() || second.is_some()).then(|| format!("{} / {} {unit}", show(first), show(second)))
}

fn ratio_text(value: Option<f64>, reference: Option<f64>, name: &str) -> String {
    match (value, reference) {
        (Some(value), Some(reference)) if reference > 0.0 => format!("{:.2}× {name}", value / reference),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(whole(1234567.4), "1,234,567");
        assert_eq!(whole(812.0), "812");
        assert_eq!(whole(12.34), "12.3");
        assert_eq!(whole(5.0), "5");
        assert_eq!(percent(0.0376), "3.8 %");
    }
}
