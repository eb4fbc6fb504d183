//! `kybernate metrics` end to end: attempts made through a private containerd 1.6 (the test bed:
//! `test/setup.sh`) running our shim, runc and CRIU are journaled by the shim; the CLI prints
//! them as Prometheus text and serves them, and a real Prometheus (Debian's, unpacked by
//! `test/setup.sh`) scrapes the server and answers a query with the same numbers.
//!
//! Needs our shim built (`cargo build -p containerd-shim-kybernate-v1`): see common/mod.rs.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_exit_ok, bed, json, task_status, text, wait_for, Bed, KYBERNATE, RUNTIME};
use kybernate_checkpoint::journal::{Attempt, Kind, Outcome, JOURNAL_DIR, JOURNAL_FILE};
use kybernate_testbed::{unique_name, IMAGE};
use serde_json::Value;

/// Debian's prometheus, unpacked by test/setup.sh (`KBT_PROMETHEUS_PREFIX` in test/lib/common.sh).
const PROMETHEUS: &str = "/opt/kybernate-test/prometheus/usr/bin/prometheus";

/// A child process killed when the test ends, passing or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 exchange (`Connection: close`): the status line's code and the body.
fn http(port: u16, request: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let code = reply.split(' ').nth(1)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((code, body))
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
}

fn journal(bed: &Bed) -> Vec<Attempt> {
    let text = std::fs::read_to_string(bed.store.join(JOURNAL_DIR).join(JOURNAL_FILE)).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l}: {e}"))).collect()
}

/// The value of the instant-query result whose labels include `labels`, from Prometheus's API.
fn query(port: u16, promql: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let q: String = promql
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let (code, body) = get(port, &format!("/api/v1/query?query={q}"))?;
    let v: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    v["data"]["result"].as_array()?.iter().find_map(|r| {
        labels.iter().all(|(k, want)| r["metric"][k] == *want).then(|| r["value"][1].as_str()?.parse().ok())?
    })
}

#[test]
fn attempts_are_journaled_and_prometheus_scrapes_their_metrics() {
    assert!(Path::new(PROMETHEUS).is_file(), "{PROMETHEUS} not found: run test/setup.sh");
    let bed = bed();
    let id = unique_name("mx");
    // With containerd's RuntimeDefault seccomp profile, so that the restore needs no --trust-spec.
    bed.run_counter_with(&id, RUNTIME, &["--seccomp"]);
    bed.wait_counter(&id, 3);

    // A checkpoint that leaves the container running, then its restore as a new container.
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id]);
    assert_exit_ok(&out);
    let cp = json(&out)["id"].as_str().expect("id").to_string();
    let new_id = unique_name("mxr");
    let out = bed.kybernate(&["-o", "json", "restore", &cp, "--as", &new_id]);
    assert_exit_ok(&out);
    assert_eq!(task_status(&bed.tb, &new_id).as_deref(), Some("RUNNING"));
    // A failed attempt: restore-on-create from a checkpoint that is not in the store.
    let bad = unique_name("mxbad");
    let annotation = "kybernate.io/restore-from=default/nothing/here";
    let failed = bed.tb.ctr(&["run", "-d", "--runtime", RUNTIME, "--annotation", annotation, IMAGE, &bad, "true"]);
    assert!(!failed.status.success(), "a restore from a missing checkpoint ran: {}", text(&failed.stdout));
    let _ = bed.tb.ctr(&["containers", "delete", &bad]);

    // The shim's journal: one line each, with the phases and the frozen time.
    let lines = journal(&bed);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let ckpt = &lines[0];
    assert_eq!((ckpt.kind, ckpt.result, ckpt.checkpoint.as_str()), (Kind::Checkpoint, Outcome::Ok, cp.as_str()));
    assert_eq!((ckpt.namespace.as_str(), ckpt.container.as_str()), (bed.tb.namespace(), id.as_str()));
    for phase in ["freeze", "dump", "rootfs_diff", "thaw", "hash", "commit"] {
        assert!(ckpt.phases_ms.contains_key(phase), "no {phase} phase: {ckpt:?}");
    }
    eprintln!("checkpoint attempt: {ckpt:?}");
    let frozen = ckpt.frozen_ms.expect("frozen time of a leave-running checkpoint");
    assert!(frozen >= ckpt.phases_ms["dump"] && frozen <= ckpt.duration_ms, "{ckpt:?}");
    assert!(ckpt.bytes > 0, "{ckpt:?}");
    let restore = &lines[1];
    assert_eq!(
        (restore.kind, restore.result, restore.container.as_str()),
        (Kind::Restore, Outcome::Ok, new_id.as_str())
    );
    assert!(restore.phases_ms.contains_key("verify") && restore.phases_ms.contains_key("restore"), "{restore:?}");
    let refused = &lines[2];
    assert_eq!(
        (refused.kind, refused.result, refused.container.as_str()),
        (Kind::Restore, Outcome::Error, bad.as_str())
    );
    assert_eq!(refused.error_class.as_deref(), Some("store"), "{refused:?}");
    let journal_dir = bed.store.join(JOURNAL_DIR);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&journal_dir).unwrap().permissions().mode() & 0o777, 0o700);
    // The store's listing does not take the journal for a namespace.
    let out = bed.kybernate(&["-o", "json", "list"]);
    assert_exit_ok(&out);
    assert_eq!(json(&out).as_array().map(Vec::len), Some(1), "{}", text(&out.stdout));

    // Printed once.
    let out = bed.kybernate(&["metrics"]);
    assert_exit_ok(&out);
    let exposition = text(&out.stdout);
    for line in [
        "kybernate_checkpoints_total{result=\"ok\"} 1",
        "kybernate_checkpoints_total{result=\"error\"} 0",
        "kybernate_restores_total{result=\"ok\"} 1",
        "kybernate_restores_total{result=\"error\"} 1",
        "kybernate_restore_errors_total{class=\"store\"} 1",
        "kybernate_checkpoint_frozen_seconds_count 1",
        "kybernate_checkpoint_duration_seconds_count 1",
    ] {
        assert!(exposition.lines().any(|l| l == line), "no {line:?} in:\n{exposition}");
    }

    // Served, and scraped by Prometheus every second.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Command::new(KYBERNATE)
        .args(["--config", bed.config.to_str().unwrap(), "metrics", "--listen", &listen])
        .stdout(Stdio::null())
        .spawn()
        .map(Killed)
        .expect("kybernate metrics --listen");
    let (code, body) = wait_for("the metrics server", || get(port, "/metrics"));
    assert_eq!((code, body.as_str()), (200, exposition.as_str()));
    // Bad requests get HTTP errors, and the server keeps serving.
    assert_eq!(get(port, "/nope").map(|r| r.0), Some(404));
    assert_eq!(
        http(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").map(|r| r.0),
        Some(405)
    );
    assert_eq!(http(port, "\u{1}\u{2} garbage\r\n\r\n").map(|r| r.0), Some(400));
    assert_eq!(get(port, "/metrics").map(|r| r.0), Some(200));

    let prom_dir = bed.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kybernate\n    static_configs:\n      - targets: ['{listen}']\n"),
    )
    .unwrap();
    let prom_port = free_port();
    let log = std::fs::File::create(prom_dir.join("prometheus.log")).unwrap();
    let _prometheus = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Killed)
        .expect("prometheus");
    let started = Instant::now();
    let deadline = Duration::from_secs(30);
    let answered = loop {
        let ok = query(prom_port, "kybernate_checkpoints_total", &[("result", "ok"), ("job", "kybernate")]);
        let failed = query(prom_port, "kybernate_restores_total", &[("result", "error")]);
        if ok == Some(1.0) && failed == Some(1.0) {
            break true;
        }
        if started.elapsed() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let prom_log = std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default();
    assert!(answered, "Prometheus did not answer with the counters in {deadline:?}; its log:\n{prom_log}");
    eprintln!("Prometheus answered after {:?}", started.elapsed());
    let up = query(prom_port, "up", &[("job", "kybernate")]);
    assert_eq!(up, Some(1.0), "the scrape target is not up");
    assert_eq!(query(prom_port, "kybernate_checkpoint_frozen_seconds_count", &[]), Some(1.0));
    drop(server);

    bed.remove(&new_id);
    bed.remove(&id);
}

/// The installer's DaemonSet serves the metrics on the port its Prometheus annotations name.
#[test]
fn the_daemonset_serves_metrics_where_its_annotations_say() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/kubernetes/installer/daemonset.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let template = &ds["spec"]["template"];
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let port = annotations["prometheus.io/port"].as_str().expect("prometheus.io/port").to_string();
    let containers = template["spec"]["containers"].as_sequence().unwrap();
    assert_eq!(containers[0]["name"], "installer", "the installer stays the first container");
    let metrics = containers.iter().find(|c| c["name"] == "metrics").expect("a metrics container");
    let command: Vec<&str> = metrics["command"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(command.last().unwrap().ends_with(&format!("kybernate metrics --listen :{port}")), "{command:?}");
    let ports = metrics["ports"].as_sequence().unwrap();
    assert_eq!(ports[0]["containerPort"].as_u64().map(|p| p.to_string()), Some(port));
    assert_eq!(metrics["securityContext"]["privileged"].as_bool(), Some(false));
    let mount = &metrics["volumeMounts"][0];
    assert_eq!((mount["mountPath"].as_str(), mount["readOnly"].as_bool()), (Some("/host"), Some(true)));
}
