//! All of it at once: `scripts/chaos.sh --short`, three instances under one
//! fault after another, judged by the `chaos_check` example.

use std::process::Command;

use super::ServicesGuard;

#[test]
fn serial_chaos_short() {
    let _services = ServicesGuard;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chaos.sh");
    let output = Command::new(script)
        .arg("--short")
        .output()
        .expect("run scripts/chaos.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scripts/chaos.sh --short failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let header = stdout
        .lines()
        .find(|line| line.starts_with("instance "))
        .unwrap_or_else(|| panic!("no summary table:\n{stdout}"));
    for column in [
        "expected",
        "recorded",
        "published",
        "lost",
        "duplicated",
        "wrong-id",
        "double",
    ] {
        assert!(header.contains(column), "{header}");
    }
    for instance in ["chaos-1", "chaos-2", "chaos-3"] {
        let row = stdout
            .lines()
            .find(|line| line.starts_with(instance))
            .unwrap_or_else(|| panic!("no summary for {instance}:\n{stdout}"));
        let numbers: Vec<u64> = row
            .split_whitespace()
            .skip(1)
            .map(|number| number.parse().expect("a count"))
            .collect();
        let [expected, recorded, published, lost, _duplicated, unpublished, wrong_instance, double] =
            numbers[..]
        else {
            panic!("{row}");
        };
        assert!(expected > 0, "{row}");
        assert_eq!(
            (recorded, published, lost, unpublished, wrong_instance, double),
            (expected, expected, 0, 0, 0, 0),
            "{row}"
        );
    }
}
