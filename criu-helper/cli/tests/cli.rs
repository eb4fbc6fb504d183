//! The `kybernate` CLI against a temporary store: output, exit codes and what it does to the store.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use kybernate_checkpoint::{dir_size, read_manifest, verify, write_origin, Origin};
use serde_json::Value;

mod common;

use common::{fake_checkpoint_with, fake_manifest, kubelet_archive, show, Node};
use kybernate_gpu::cuda::ProcessState;
use kybernate_gpu::{CudaProcessRecord, GpuInfo, GpuMode, GpuRecord};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect()
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn list_table_and_json_newest_first_with_filters() {
    let node = Node::new();
    let old = node.checkpoint("k8s.io", "web", 3 * DAY);
    let new = node.checkpoint("k8s.io", "web", HOUR);
    let mid = node.checkpoint("default", "db", DAY);

    let out = node.run(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for col in ["ID", "CONTAINER", "NAMESPACE", "CREATED", "SIZE", "GPU", "STATUS"] {
        assert!(lines[0].contains(col), "{text}");
    }
    assert!(lines[1].starts_with(&new) && lines[2].starts_with(&mid) && lines[3].starts_with(&old), "{text}");
    assert!(lines[1].contains("KiB") && lines[1].ends_with("ok"), "{text}");

    let all = node.json(&["list"], 0);
    assert_eq!(ids(&all), vec![new.clone(), mid.clone(), old.clone()]);
    let first = &all[0];
    for key in [
        "id",
        "path",
        "namespace",
        "container",
        "created",
        "size_bytes",
        "gpu",
        "pod_namespace",
        "pod_name",
        "image",
        "runtime",
        "criu_version",
        "status",
        "error",
    ] {
        assert!(first.get(key).is_some(), "missing {key}: {first}");
    }
    assert_eq!(first["namespace"], "k8s.io");
    assert_eq!(first["container"], "web");
    assert_eq!(first["gpu"], false);
    assert_eq!(first["status"], "ok");
    assert!(first["error"].is_null());
    assert_eq!(first["criu_version"], "4.2");
    assert_eq!(first["runtime"]["path"], "/usr/bin/runc");
    assert_eq!(first["path"], node.root().join(&new).to_str().unwrap());
    assert!(first["size_bytes"].as_u64().unwrap() > 50_000);
    assert!(humantime::parse_rfc3339(first["created"].as_str().unwrap()).is_ok());

    assert_eq!(ids(&node.json(&["list", "--namespace", "k8s.io"], 0)), vec![new.clone(), old.clone()]);
    assert_eq!(ids(&node.json(&["-n", "default", "list"], 0)), vec![mid.clone()]);
    assert_eq!(ids(&node.json(&["list", "--container", "db"], 0)), vec![mid]);
    assert_eq!(ids(&node.json(&["list", "-n", "k8s.io", "--container", "db"], 0)), Vec::<String>::new());

    // CONTAINERD_NAMESPACE is the default filter.
    let out = Command::new(env!("CARGO_BIN_EXE_kybernate"))
        .args(["-o", "json", "list", "--config"])
        .arg(&node.config)
        .env("CONTAINERD_NAMESPACE", "k8s.io")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&v), vec![new, old]);
}

#[test]
fn list_shows_broken_checkpoints_and_an_empty_store() {
    let node = Node::new();
    let out = node.run(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).is_empty() && stderr(&out).contains("no checkpoints"), "{}", show(&out));
    assert_eq!(node.json(&["list"], 0), Value::Array(vec![]));

    let good = node.checkpoint("k8s.io", "web", HOUR);
    let bad = node.checkpoint("k8s.io", "web", DAY);
    fs::write(node.root().join(&bad).join("kybernate.json"), b"{not json").unwrap();
    let v = node.json(&["list"], 0);
    assert_eq!(ids(&v), vec![good, bad.clone()]);
    assert_eq!(v[1]["status"], "broken");
    assert!(v[1]["error"].as_str().unwrap().contains("kybernate.json"), "{v}");
    assert!(v[1]["gpu"].is_null() && v[1]["criu_version"].is_null());
    // Without a manifest the creation time comes from the directory name.
    assert!(v[1]["created"].as_str().is_some(), "{v}");
    let text = stdout(&node.run(&["list"]));
    assert!(text.lines().any(|l| l.starts_with(&bad) && l.contains("broken: ")), "{text}");
}

/// A manifest whose `created` lies in the future (year 9999) is a broken checkpoint, though every
/// checksum matches (the manifest itself is not hashed): `list` says why, and `prune --keep 1`
/// keeps the real newest checkpoint instead of taking the forged one for it.
#[test]
fn a_checkpoint_created_in_the_future_is_broken_and_never_the_newest() {
    let node = Node::new();
    let old = node.checkpoint("k8s.io", "web", DAY);
    let newest = node.checkpoint("k8s.io", "web", HOUR);
    let at = SystemTime::now() - Duration::from_secs(60);
    let mut m = fake_manifest("k8s.io", "web", at);
    m.created = "9999-01-01T00:00:00Z".into();
    let forged = fake_checkpoint_with(&node.store, m, at);
    assert_eq!(read_manifest(&node.root().join(&forged)).unwrap().created, "9999-01-01T00:00:00Z");

    let v = node.json(&["list"], 0);
    assert_eq!(ids(&v), vec![forged.clone(), newest.clone(), old.clone()], "sorted by the directory's time: {v}");
    assert_eq!(v[0]["status"], "broken", "{v}");
    let error = v[0]["error"].as_str().unwrap();
    assert!(
        error.contains(
            r#"kybernate.json: invalid checkpoint manifest: created "9999-01-01T00:00:00Z" is in the future"#
        ),
        "{error}"
    );
    // The time shown is the directory's, not the forged one.
    assert_eq!(v[0]["created"], humantime::format_rfc3339_seconds(at).to_string().as_str(), "{v}");
    let text = stdout(&node.run(&["list"]));
    assert!(
        text.lines().any(|l| l.starts_with(&forged) && l.contains("broken: ") && l.contains("in the future")),
        "{text}"
    );
    assert!(!text.contains("9999-01-01T00:00:00Z  "), "a forged time in the CREATED column: {text}");

    let v = node.json(&["prune", "--keep", "1", "--dry-run"], 0);
    assert_eq!(ids(&v), vec![old.clone()], "{v}");
    let v = node.json(&["prune", "--keep", "1"], 0);
    assert_eq!(ids(&v), vec![old], "{v}");
    assert_eq!(ids(&node.json(&["list"], 0)), vec![forged.clone(), newest.clone()]);
    // Neither restored nor exported: verification refuses it, naming the field.
    let out = node.run(&["restore", &forged, "--pod-annotation"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains(r#"created "9999-01-01T00:00:00Z" is in the future"#), "{}", show(&out));
    assert!(node.root().join(&newest).is_dir());
}

/// A manifest is untrusted text: a pod name with terminal escape sequences (a broken checkpoint,
/// since names are validated) is listed, inspected and reported, but its control characters never
/// reach the terminal raw, in tables, JSON or error messages.
#[test]
fn control_characters_in_a_manifest_never_reach_the_terminal() {
    let node = Node::new();
    let at = SystemTime::now() - Duration::from_secs(60);
    let mut m = fake_manifest("k8s.io", "web", at);
    m.pod_name = Some("evil\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m".into());
    let forged = fake_checkpoint_with(&node.store, m, at);
    for args in [&["list"][..], &["-o", "json", "list"], &["inspect", &forged], &["-o", "json", "inspect", &forged]] {
        let out = node.run(args);
        for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            let raw = String::from_utf8_lossy(bytes);
            assert!(
                !raw.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
                "kybernate {args:?}: a raw control character on {stream}: {raw:?}"
            );
        }
    }
    let v = node.json(&["list"], 0);
    assert_eq!(v[0]["status"], "broken", "{v}");
}

/// A checkpoint the shim is still writing (its hidden partial directory, manifest and all) is no
/// CHECKPOINT for any command, by id, absolute or relative path, or a visible link to it.
#[test]
fn hidden_work_dirs_are_refused_by_every_command() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let p = kybernate_checkpoint::PartialCheckpoint::begin(&node.store.root().join("k8s.io/web/20261207T120000.000Z"))
        .unwrap();
    fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    let committed = node.root().join(&id);
    for file in ["kybernate.json", "spec.dump"] {
        fs::copy(committed.join(file), p.dir().join(file)).unwrap();
    }
    let name = p.dir().file_name().unwrap().to_str().unwrap().to_string();
    let partial = node.root().join("k8s.io/web").join(&name);
    std::os::unix::fs::symlink(&name, node.root().join("k8s.io/web/latest")).unwrap();
    let archive = node.tmp.path().join("partial.tar");
    let hidden_id = format!("k8s.io/web/{name}");
    for reference in [hidden_id.as_str(), partial.to_str().unwrap(), "k8s.io/web/latest"] {
        for args in [
            &["inspect", reference][..],
            &["rm", reference],
            &["export", reference, archive.to_str().unwrap()],
            &["restore", reference, "--pod-annotation"],
            &["--address", "/nonexistent/containerd.sock", "restore", reference],
        ] {
            let out = node.run(args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
            let err = stderr(&out);
            assert!(err.starts_with(&format!("kybernate: checkpoint {reference:?} resolves to ")), "{args:?}: {err}");
            let why = "is a hidden work directory (a checkpoint being written, removed or imported), not a committed \
                       checkpoint";
            assert!(err.contains(&format!("{name:?} {why}")), "{args:?}: {err}");
            assert!(err.trim_end().lines().count() == 1, "{err}");
        }
    }
    let out = node.run_in(partial.parent().unwrap(), &["inspect", &format!("./{name}")]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("is a hidden work directory"), "{}", show(&out));
    assert!(partial.is_dir() && !archive.exists(), "a refused command touched the work dir");
    // Not listed either; the committed checkpoint still is, and still resolves.
    assert_eq!(ids(&node.json(&["list"], 0)), vec![id.clone()]);
    assert_eq!(node.json(&["inspect", &id], 0)["verification"]["ok"], true);
    drop(p);
}

#[test]
fn inspect_shows_manifest_and_verification() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let v = node.json(&["inspect", &id], 0);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["verification"]["ok"], true);
    assert!(v["verification"]["error"].is_null());
    assert_eq!(v["manifest"]["container_id"], "web");
    assert_eq!(v["manifest"]["options"]["open_tcp"], true);
    assert!(v["manifest"]["files"]["checkpoint/pages-1.img"]["blake3"].is_string());

    let out = node.run(&["inspect", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // Padding aside: `verification:   ok` reads as `verification: ok`.
    let text = stdout(&out).split_whitespace().collect::<Vec<_>>().join(" ");
    for want in
        ["criu:", "4.2", "runc version 1.2.5", "kernel:", "6.1.0", "host:", "node-1", "open_tcp", "verification: ok"]
    {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }

    // By absolute path and by a path relative to the working directory.
    let dir = node.root().join(&id);
    assert_eq!(node.json(&["inspect", dir.to_str().unwrap()], 0)["id"], id.as_str());
    let out = node.run_in(dir.parent().unwrap(), &["inspect", dir.file_name().unwrap().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn inspect_of_a_tampered_checkpoint_fails_and_names_the_file() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let pages = node.root().join(&id).join("checkpoint/pages-1.img");
    fs::write(&pages, vec![8u8; 50_000]).unwrap();

    let v = node.json(&["inspect", &id], 1);
    assert_eq!(v["verification"]["ok"], false);
    let error = v["verification"]["error"].as_str().unwrap();
    assert!(error.contains("pages-1.img") && error.contains("checksum"), "{error}");
    assert_eq!(v["status"], "broken");

    let out = node.run(&["inspect", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stdout(&out).split_whitespace().collect::<Vec<_>>().join(" ").contains("verification: FAILED"),
        "{}",
        show(&out)
    );
    let err = stderr(&out);
    assert!(
        err.starts_with("kybernate: ") && err.contains("pages-1.img") && err.trim_end().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn rm_removes_checkpoints_and_empty_parents_but_keeps_the_root() {
    let node = Node::new();
    let a = node.checkpoint("k8s.io", "web", HOUR);
    let b = node.checkpoint("k8s.io", "web", DAY);
    let c = node.checkpoint("k8s.io", "db", DAY);
    let root = node.root();

    let v = node.json(&["rm", &a], 0);
    assert_eq!(ids(&v), vec![a.clone()]);
    assert!(!root.join(&a).exists());
    assert!(root.join("k8s.io/web").is_dir(), "container dir still holds {b}");

    let out = node.run(&["rm", &b, root.join(&c).to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).contains("removed 2 checkpoints"), "{}", show(&out));
    assert!(!root.join("k8s.io").exists(), "empty container and namespace dirs are removed");
    assert!(root.is_dir(), "the store root stays");
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
}

#[test]
fn rm_of_unknown_or_outside_references_is_refused_and_removes_nothing() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);

    let out = node.run(&["rm", &id, "k8s.io/web/nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.starts_with("kybernate: checkpoint \"k8s.io/web/nope\" not found"), "{err}");
    assert!(err.contains("kybernate list"), "{err}");
    assert!(node.root().join(&id).is_dir(), "nothing removed");

    let outside = node.tmp.path().join("elsewhere");
    fs::create_dir(&outside).unwrap();
    for reference in [outside.to_str().unwrap(), "./config.toml", "k8s.io/../../elsewhere"] {
        let out = node.run(&["rm", reference]);
        assert_eq!(out.status.code(), Some(2), "{reference}: {}", show(&out));
        assert!(stderr(&out).contains("not inside the checkpoint store"), "{reference}: {}", show(&out));
    }
    // Inside the store but not a checkpoint: the namespace dir, the root itself.
    for reference in ["k8s.io", "k8s.io/web"] {
        let out = node.run(&["rm", reference]);
        assert_eq!(out.status.code(), Some(2), "{reference}: {}", show(&out));
        assert!(stderr(&out).contains("is not a checkpoint"), "{reference}: {}", show(&out));
    }
    let out = node.run(&["inspect", node.root().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(node.root().join(&id).is_dir() && outside.is_dir());
}

#[test]
fn prune_keeps_the_newest_per_container() {
    let node = Node::new();
    let web_new = node.checkpoint("k8s.io", "web", HOUR);
    let web_mid = node.checkpoint("k8s.io", "web", DAY);
    let web_old = node.checkpoint("k8s.io", "web", 3 * DAY);
    let db = node.checkpoint("k8s.io", "db", 10 * DAY);

    let v = node.json(&["prune", "--keep", "1", "--dry-run"], 0);
    assert_eq!(ids(&v), vec![web_mid.clone(), web_old.clone()]);
    assert_eq!(ids(&node.json(&["list"], 0)).len(), 4, "dry run removes nothing");

    let v = node.json(&["prune", "--keep", "1"], 0);
    assert_eq!(ids(&v), vec![web_mid, web_old]);
    assert_eq!(ids(&node.json(&["list"], 0)), vec![web_new, db]);
}

#[test]
fn prune_older_than_with_dry_run_and_filters() {
    let node = Node::new();
    let recent = node.checkpoint("k8s.io", "web", HOUR);
    let old = node.checkpoint("k8s.io", "web", 3 * DAY);
    let other = node.checkpoint("default", "db", 3 * DAY);

    let out = node.run(&["prune", "--older-than", "2d", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).contains("would remove 2 checkpoints"), "{}", show(&out));
    assert_eq!(ids(&node.json(&["list"], 0)).len(), 3);

    let v = node.json(&["prune", "--older-than", "2d", "--namespace", "k8s.io"], 0);
    assert_eq!(ids(&v), vec![old]);
    assert_eq!(ids(&node.json(&["list"], 0)), vec![recent.clone(), other]);
    assert_eq!(node.json(&["prune", "--older-than", "12h", "--container", "web"], 0), Value::Array(vec![]));
    assert_eq!(ids(&node.json(&["prune", "--older-than", "30m", "--container", "web"], 0)), vec![recent]);
}

/// Without --keep or --older-than, `prune` applies the config's retention policy as the shim does
/// after each checkpoint: `keep` per container, then `max_bytes` over the store (pulled copies
/// first; never a container's newest checkpoint taken on this node).
#[test]
fn prune_applies_the_configured_retention_policy() {
    let node = Node::new();
    let web_new = node.checkpoint("k8s.io", "web", HOUR);
    let web_mid = node.checkpoint("k8s.io", "web", DAY);
    let web_old = node.checkpoint("k8s.io", "web", 3 * DAY);
    let db = node.checkpoint("k8s.io", "db", 10 * DAY);
    let pulled = node.checkpoint("k8s.io", "api", 2 * HOUR);
    let origin = Origin::Pull { reference: "registry.test/api:1".into(), digest: format!("sha256:{}", "a".repeat(64)) };
    write_origin(&node.root().join(&pulled), &origin).unwrap();
    let size =
        [&web_new, &web_mid, &web_old, &db, &pulled].iter().map(|id| dir_size(&node.root().join(id))).max().unwrap();
    let policy = |max: u64| {
        let root = node.store.root().to_str().unwrap();
        fs::write(&node.config, format!("[checkpoint]\nroot = {root:?}\nkeep = 2\nmax_bytes = {max}\n")).unwrap();
    };
    // keep = 2 removes web's oldest; the four left are above 3.5 checkpoints: the pulled copy goes.
    policy(size * 7 / 2);
    let v = node.json(&["prune", "--dry-run"], 0);
    assert_eq!(ids(&v), vec![pulled.clone(), web_old.clone()]);
    assert_eq!(ids(&node.json(&["list"], 0)).len(), 5, "dry run removes nothing");
    let out = node.run(&["prune", "--dry-run"]);
    assert!(stdout(&out).contains("would remove 2 checkpoints"), "{}", show(&out));
    assert_eq!(ids(&node.json(&["prune"], 0)), vec![pulled, web_old]);
    assert_eq!(ids(&node.json(&["list"], 0)), vec![web_new.clone(), web_mid.clone(), db.clone()]);
    assert_eq!(node.json(&["prune"], 0), Value::Array(vec![]), "the store is within its limits");
    // Room for 1.5: web's older one goes, but web's and db's newest stay, and the store says so.
    policy(size * 3 / 2);
    let out = node.run(&["-o", "json", "prune"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(ids(&serde_json::from_slice(&out.stdout).unwrap()), vec![web_mid]);
    assert!(stderr(&out).contains("above [checkpoint] max_bytes"), "{}", show(&out));
    assert_eq!(ids(&node.json(&["list"], 0)), vec![web_new, db]);
    // A bad value is the config's error, naming the key.
    fs::write(&node.config, "[checkpoint]\nmax_bytes = \"lots\"\n").unwrap();
    let out = node.run(&["prune"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("checkpoint.max_bytes") && stderr(&out).contains("not a size"), "{}", show(&out));
}

#[test]
fn prune_sweeps_work_dirs_left_by_dead_writers() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let parent = node.root().join(&id).parent().unwrap().to_path_buf();
    // A partial checkpoint of a shim that is gone (no such pid), and one of this very process.
    let dead = parent.join(".20261123T212501.123Z.partial-999999999-1700000000");
    let live = parent.join(format!(".20261123T212502.123Z.partial-{}-1700000001", std::process::id()));
    fs::create_dir_all(dead.join("checkpoint")).unwrap();
    fs::create_dir_all(&live).unwrap();

    let out = node.run(&["prune", "--keep", "5", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stderr(&out).contains("would remove") && stderr(&out).contains("partial-999999999"), "{}", show(&out));
    assert!(dead.exists(), "dry run removed a work dir");

    let v = node.json(&["prune", "--keep", "5"], 0);
    assert_eq!(v, Value::Array(vec![]), "the checkpoint itself is kept");
    assert!(!dead.exists(), "stale partial dir kept");
    assert!(live.exists(), "a live writer's partial dir was removed");
    assert_eq!(ids(&node.json(&["list"], 0)), vec![id]);
}

#[test]
fn export_rm_import_round_trip() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let before = read_manifest(&node.root().join(&id)).unwrap();
    let archive = node.tmp.path().join("web.tar");

    let v = node.json(&["export", &id, archive.to_str().unwrap()], 0);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["archive"]["path"], fs::canonicalize(&archive).unwrap().to_str().unwrap());
    assert_eq!(v["archive"]["size_bytes"], fs::metadata(&archive).unwrap().len());

    // Never over an existing file, never into the store.
    let out = node.run(&["export", &id, archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("already exists"), "{}", show(&out));
    let inside = node.root().join(&id).join("x.tar");
    let out = node.run(&["export", &id, inside.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(!inside.exists());

    node.json(&["rm", &id], 0);
    assert_eq!(node.json(&["list"], 0), Value::Array(vec![]));

    let v = node.json(&["import", archive.to_str().unwrap()], 0);
    let new_id = v["id"].as_str().unwrap();
    assert_eq!(v["namespace"], "k8s.io");
    assert_eq!(v["container"], "web");
    let dir = node.root().join(new_id);
    assert_eq!(verify(&dir).unwrap(), before);
    assert_eq!(node.json(&["inspect", new_id], 0)["verification"]["ok"], true);
}

/// `--compress zstd` (or the config's `[checkpoint] compress`, which `--compress none`
/// overrides) writes a zstd tar; `import` reads it like a plain one; a truncated copy is one
/// clean error line and leaves nothing.
#[test]
fn export_compresses_by_flag_or_config_and_import_reads_either() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let before = read_manifest(&node.root().join(&id)).unwrap();
    let zst = node.tmp.path().join("web.tar.zst");
    let v = node.json(&["export", "--compress", "zstd", &id, zst.to_str().unwrap()], 0);
    assert_eq!(v["archive"]["compression"], "zstd");
    let bytes = fs::read(&zst).unwrap();
    assert_eq!(bytes[..4], [0x28, 0xb5, 0x2f, 0xfd], "zstd's magic");
    assert_eq!(v["archive"]["size_bytes"], bytes.len());

    let text = fs::read_to_string(&node.config).unwrap();
    fs::write(&node.config, format!("{text}compress = \"zstd\"\n")).unwrap();
    let by_config = node.tmp.path().join("by-config.tar");
    let out = node.run(&["export", &id, by_config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).contains(", zstd)"), "{}", show(&out));
    assert_eq!(fs::read(&by_config).unwrap()[..4], bytes[..4]);
    let plain = node.tmp.path().join("plain.tar");
    let v = node.json(&["export", "--compress", "none", &id, plain.to_str().unwrap()], 0);
    assert_eq!(v["archive"]["compression"], "none");
    assert_ne!(fs::read(&plain).unwrap()[..4], bytes[..4]);

    node.json(&["rm", &id], 0);
    let truncated = node.tmp.path().join("cut.tar.zst");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = node.run(&["import", truncated.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.starts_with(&format!("kybernate: {}: corrupt zstd stream near byte ", truncated.display())), "{err}");
    assert!(err.contains("truncated") && err.contains("copy the archive again"), "{err}");
    assert!(err.trim_end().lines().count() == 1, "{err}");
    assert_store_empty(&node);

    for archive in [&zst, &plain] {
        let v = node.json(&["import", archive.to_str().unwrap()], 0);
        assert_eq!(verify(&node.root().join(v["id"].as_str().unwrap())).unwrap(), before);
    }
    let out = node.run(&["export", "--compress", "gzip", "x", "y"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("none") && stderr(&out).contains("zstd"), "{}", show(&out));
}

#[test]
fn import_of_a_tampered_archive_fails_and_leaves_nothing() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let archive = node.tmp.path().join("web.tar");
    node.json(&["export", &id, archive.to_str().unwrap()], 0);
    node.json(&["rm", &id], 0);

    // Flip bytes of the page image inside the tar (its content is 7s; write 9s over some).
    let mut bytes = fs::read(&archive).unwrap();
    let at = bytes.windows(64).position(|w| w.iter().all(|&b| b == 7)).unwrap();
    bytes[at..at + 64].fill(9);
    fs::write(&archive, &bytes).unwrap();

    let out = node.run(&["import", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.starts_with("kybernate: ") && err.contains("pages-1.img"), "{err}");
    let left: Vec<_> = fs::read_dir(node.root()).unwrap().collect();
    assert!(left.is_empty(), "store must be empty, has {left:?}");

    let out = node.run(&["import", node.tmp.path().join("missing.tar").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

/// Appends a regular file (or, for `None`, a directory) to a tar being built.
fn tar_entry<W: std::io::Write>(tar: &mut tar::Builder<W>, path: &str, data: Option<&[u8]>) {
    let mut h = tar::Header::new_gnu();
    match data {
        Some(d) => {
            h.set_size(d.len() as u64);
            h.set_mode(0o600);
        }
        None => {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o700);
        }
    }
    tar.append_data(&mut h, path, data.unwrap_or_default()).unwrap();
}

/// The store holds nothing (a refused import leaves no work dir behind).
fn assert_store_empty(node: &Node) {
    let left: Vec<_> = fs::read_dir(node.root()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "store must be empty, has {left:?}");
}

/// A tar bomb in `kybernate export`'s format (the manifest first) is refused at its first
/// unlisted entry, while reading: the archive goes on with a header that does not parse, which an
/// import that extracted everything before checking would report instead. A bomb of 2000-deep
/// directories before any manifest is refused at the depth bound. Neither leaves anything behind.
#[test]
fn import_of_a_tar_bomb_stops_at_the_first_unlisted_entry() {
    let node = Node::new();
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let dir = node.root().join(&id);
    let manifest = fs::read(dir.join(kybernate_checkpoint::MANIFEST_FILE)).unwrap();
    node.json(&["rm", &id], 0);

    let archive = node.tmp.path().join("bomb.tar");
    let mut tar = tar::Builder::new(fs::File::create(&archive).unwrap());
    tar_entry(&mut tar, "kybernate.json", Some(&manifest));
    tar_entry(&mut tar, "checkpoint/", None);
    tar_entry(&mut tar, "checkpoint/inventory.img", Some(b"inventory"));
    for i in 0..1000 {
        tar_entry(&mut tar, &format!("bomb/f{i}"), Some(b""));
    }
    let mut file = tar.into_inner().unwrap();
    std::io::Write::write_all(&mut file, &[0xffu8; 1024]).unwrap();
    drop(file);
    let out = node.run(&["import", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: refused archive entry \"bomb/f0\": not listed in the archive's manifest",
            archive.display()
        )),
        "{err}"
    );
    assert!(err.contains("nothing was imported") && err.trim_end().lines().count() == 1, "{err}");
    assert_store_empty(&node);

    let deep = node.tmp.path().join("deep.tar");
    let mut tar = tar::Builder::new(fs::File::create(&deep).unwrap());
    let mut path = String::new();
    for _ in 0..2000 {
        path.push_str("d/");
        tar_entry(&mut tar, &path, None);
    }
    tar.finish().unwrap();
    drop(tar);
    let out = node.run(&["import", deep.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("refused archive entry \"{}\": nested deeper than 8 levels", "d/".repeat(9))),
        "{err}"
    );
    assert_store_empty(&node);
}

/// Not a tar at all: one clean line naming the file, where and what, no raw bytes; a manifest
/// whose namespace the store cannot hold is refused before anything it lists is unpacked, with a
/// hint about the manifest (not about disk space).
#[test]
fn import_of_garbage_or_a_bad_manifest_says_what_and_where() {
    let node = Node::new();
    let garbage = node.tmp.path().join("garbage.tar");
    fs::write(&garbage, (0..=255u8).cycle().take(4096).collect::<Vec<u8>>()).unwrap();
    let out = node.run(&["import", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("kybernate: {}: not a valid tar archive at byte 0 (entry 1): ", garbage.display())),
        "{err}"
    );
    assert!(err.chars().all(|c| c == '\n' || (!c.is_control() && c != char::REPLACEMENT_CHARACTER)), "{err:?}");
    assert!(err.contains("nothing was imported") && err.trim_end().lines().count() == 1, "{err}");
    assert_store_empty(&node);

    let bad = node.tmp.path().join("bad-ns.tar");
    let mut tar = tar::Builder::new(fs::File::create(&bad).unwrap());
    let mut m = fake_manifest("bad ns", "web", SystemTime::now() - HOUR);
    m.files.insert(
        "checkpoint/inventory.img".into(),
        kybernate_checkpoint::FileEntry { size: 3, blake3: Some("00".into()), ..Default::default() },
    );
    tar_entry(&mut tar, "kybernate.json", Some(&serde_json::to_vec(&m).unwrap()));
    tar_entry(&mut tar, "checkpoint/inventory.img", Some(b"inv"));
    tar.finish().unwrap();
    drop(tar);
    let out = node.run(&["import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: entry \"kybernate.json\": invalid checkpoint manifest: namespace \"bad ns\"",
            bad.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("the archive's manifest is not one this Kybernate writes") && !err.contains("free space"),
        "{err}"
    );
    assert_store_empty(&node);
}

/// A kubelet/crictl archive not taken through our shim (the stock runc shim's, CRI-O's: CRIU's
/// images in `checkpoint/` without our manifest, CRI's dumps beside them, a gzip RW diff) whose
/// images are not CRIU's: `kybernate import` refuses it naming the image, and leaves the store
/// empty. (Good ones get a generated manifest: criu-helper/checkpoint/tests/archive.rs, and a
/// real one from containerd 2.1's runc handler: shim/tests/kubelet_archive.rs.)
#[test]
fn import_of_a_foreign_kubelet_archive_is_refused_and_leaves_nothing() {
    let node = Node::new();
    let archive = node.tmp.path().join("checkpoint-pod_default-counter-2026-11-24T00:00:00Z.tar");
    let mut tar = tar::Builder::new(fs::File::create(&archive).unwrap());
    for (path, data) in [
        ("checkpoint/inventory.img", &b"\x01\x02"[..]),
        ("checkpoint/pages-1.img", &[7u8; 4096][..]),
        ("config.dump", br#"{"id":"abc","name":"counter"}"#),
        ("spec.dump", br#"{"ociVersion":"1.2.0"}"#),
        ("status.dump", br#"{"exit_code":0}"#),
        ("rootfs-diff.tar", &[0x1f, 0x8b, 0x08, 0x00][..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        tar.append_data(&mut h, path, data).unwrap();
    }
    tar.finish().unwrap();
    drop(tar);

    let out = node.run(&["import", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.starts_with("kybernate: ") && err.trim_end().lines().count() == 1, "{err}");
    for want in [
        archive.to_str().unwrap(),
        "refused archive entry \"checkpoint/inventory.img\"",
        "not CRIU's images of a process tree",
        "nothing was imported",
    ] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    let left: Vec<_> = fs::read_dir(node.root()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "store must be empty, has {left:?}");
}

/// docs/operations.md's `kybernate import` of a kubelet archive taken through our shim: it lands
/// in the store under the checkpointed container, as a checkpoint that verifies and lists like any
/// other. (The archive's content, and a real one from containerd 2.1: criu-helper/checkpoint/tests/archive.rs,
/// shim/tests/cri.rs.)
#[test]
fn import_of_a_kubelet_archive_taken_through_our_shim() {
    let node = Node::new();
    let archive = kubelet_archive(node.tmp.path(), |_| {}, &[]);
    let out = node.run(&["import", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let first = stdout(&out).lines().next().unwrap_or_default().to_string();
    let prefix = format!("imported {} as k8s.io/abc123/", archive.display());
    assert!(first.starts_with(&prefix), "{}", show(&out));
    let id = first.strip_prefix("imported ").and_then(|l| l.split(" as ").nth(1)).unwrap().to_string();

    let v = node.json(&["inspect", &id], 0);
    assert_eq!(v["verification"]["ok"], true, "{v}");
    assert_eq!((v["namespace"].as_str(), v["container"].as_str()), (Some("k8s.io"), Some("abc123")), "{v}");
    let listed = node.json(&["list"], 0);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

#[test]
fn bad_flags_and_config_are_usage_errors() {
    let node = Node::new();
    for args in [
        &["list", "--bogus"][..],
        &["prune"],
        &["prune", "--keep", "1", "--older-than", "1d"],
        &["prune", "--keep", "0"],
        &["prune", "--keep", "many"],
        &["prune", "--older-than", "soon"],
        &["-o", "yaml", "list"],
        &["rm"],
        &["frobnicate"],
    ] {
        let out = node.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        let err = stderr(&out);
        assert!(err.starts_with("kybernate: ") && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }

    let missing = node.tmp.path().join("nope.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_kybernate")).arg("--config").arg(&missing).arg("list").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("nope.toml"), "{}", show(&out));
    fs::write(&node.config, "[checkpoint]\nrot = \"/x\"\n").unwrap();
    let out = node.run(&["list"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("rot"), "{}", show(&out));
}

/// `[checkpoint] root` must be absolute (the shim and the CLI would otherwise name different
/// stores), and `--config` naming a FIFO fails at once instead of waiting for a writer.
#[test]
fn a_relative_store_root_or_a_fifo_config_is_refused() {
    let node = Node::new();
    fs::write(&node.config, "[checkpoint]\nroot = \"store\"\n").unwrap();
    let out = node.run(&["list"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:2: key `checkpoint.root`: \"store\" is a relative path", node.config.display())),
        "{err}"
    );

    let fifo = node.tmp.path().join("fifo.toml");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kybernate"))
        .arg("--config")
        .arg(&fifo)
        .arg("list")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("kybernate --config FIFO blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("a FIFO, not a regular file"), "{}", show(&out));
}

#[test]
fn help_and_completions() {
    let node = Node::new();
    let out = node.run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for cmd in ["list", "inspect", "rm", "prune", "export", "import", "completions", "--address", "Examples:"] {
        assert!(help.contains(cmd), "{cmd} missing from help:\n{help}");
    }
    let out = node.run(&["prune", "--help"]);
    assert!(stdout(&out).contains("--older-than"), "{}", show(&out));

    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = node.run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", show(&out));
        assert!(stdout(&out).contains("kybernate"), "{shell}: {}", show(&out));
    }
    // Completions need no config: they are generated before it is read.
    let out = Command::new(env!("CARGO_BIN_EXE_kybernate")).args(["completions", "zsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

/// A driver-api checkpoint taken on one H100 (this test machine has no GPU).
fn gpu_checkpoint(node: &Node) -> String {
    let at = SystemTime::now() - HOUR;
    let mut m = fake_manifest("k8s.io", "trainer", at);
    m.gpu = Some(GpuRecord {
        mode: GpuMode::DriverApi,
        skipped: vec![],
        processes: vec![CudaProcessRecord {
            pid: 4711,
            ns_pid: 7,
            evidence: "/dev/nvidia0 open".into(),
            state_before: Some(ProcessState::Running),
            state_checkpointed: Some(ProcessState::Checkpointed),
            bytes: 8 << 30,
            gpu_minors: vec![0],
        }],
        gpus: vec![GpuInfo {
            index: 0,
            model: "NVIDIA H100 80GB HBM3".into(),
            uuid: "GPU-5a3c".into(),
            bus_id: "0000:18:00.0".into(),
            minor: Some(0),
        }],
        driver_version: Some("580.65.06".into()),
        cuda_driver_version: Some("13.0".into()),
        bytes_per_gpu: [("GPU-5a3c".to_string(), 8u64 << 30)].into(),
        bytes_total: 8 << 30,
        phases_ms: [
            ("gpu-lock".to_string(), 3u64),
            ("gpu-checkpoint".to_string(), 2100),
            ("criu-dump".to_string(), 9000),
        ]
        .into(),
        devices: Default::default(),
    });
    fake_checkpoint_with(&node.store, m, at)
}

#[test]
fn gpu_checkpoints_show_their_gpu_record_and_other_gpus_are_refused() {
    let node = Node::new();
    let id = gpu_checkpoint(&node);
    let list = node.json(&["list"], 0);
    assert_eq!(list[0]["gpu"], true, "{list}");
    assert_eq!(list[0]["gpu_mode"], "driver-api", "{list}");
    let v = node.json(&["inspect", &id], 0);
    assert_eq!(v["manifest"]["gpu"]["gpus"][0]["model"], "NVIDIA H100 80GB HBM3", "{v}");

    let out = node.run(&["inspect", &id]);
    let text = stdout(&out).split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "gpu mode: driver-api",
        "cuda procs: 4711 (checkpointed)",
        "gpus: NVIDIA H100 80GB HBM3",
        "gpu driver: driver 580.65.06, CUDA 13.0",
        "gpu bytes: 8.0 GiB",
        "gpu-checkpoint 2100 ms",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }

    // This node has no H100: refused before containerd is asked (none runs here), with the way out.
    let out = node.run(&["--address", "/nonexistent/containerd.sock", "restore", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("NVIDIA H100 80GB HBM3") && err.contains("--allow-gpu-mismatch"), "{err}");
    // Allowed: the GPU check passes (this fake checkpoint is then refused by the checks of its
    // spec and images, before containerd is asked).
    let out = node.run(&["--address", "/nonexistent/containerd.sock", "restore", &id, "--allow-gpu-mismatch"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(!stderr(&out).contains("--allow-gpu-mismatch"), "{}", show(&out));
    // For Kubernetes, the annotation that allows it comes with the restore annotation.
    let v = node.json(&["restore", &id, "--pod-annotation", "--allow-gpu-mismatch"], 0);
    assert_eq!(v["annotation"]["kybernate.io/allow-gpu-mismatch"], "true", "{v}");
    assert_eq!(v["annotation"]["kybernate.io/restore-from"], id.as_str(), "{v}");
}

/// `keygen` writes a key pair and keeps an existing one; `inspect` shows a checkpoint's signer and
/// origin; `restore` follows `[trust]` before anything else (here `--pod-annotation`, which asks no
/// containerd): an imported checkpoint signed by an untrusted key is refused naming that key.
#[test]
fn keygen_inspect_and_restore_follow_the_trust_policy() {
    use kybernate_checkpoint::signing::SigningKey;
    use std::os::unix::fs::MetadataExt;
    let node = Node::new();
    let dir_a = node.tmp.path().join("keys-a");
    let a = node.json(&["keygen", dir_a.to_str().unwrap()], 0);
    let (private, public, key_a) =
        (a["private"].as_str().unwrap(), a["public"].as_str().unwrap(), a["key_id"].as_str().unwrap().to_string());
    assert_eq!(Path::new(private), dir_a.join("kybernate.key"));
    assert_eq!(fs::metadata(private).unwrap().mode() & 0o777, 0o600);
    assert!(key_a.starts_with("sha256:") && key_a.len() == 23, "{key_a}");
    let out = node.run(&["keygen", dir_a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("--force"), "{}", show(&out));
    let dir_b = node.tmp.path().join("keys-b");
    let out = node.run(&["keygen", dir_b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).contains("key id:  sha256:"), "{}", show(&out));
    let public_b = dir_b.join("kybernate.pub");

    // Signed by A, then marked as imported (what `kybernate import` does).
    let id = node.checkpoint("k8s.io", "web", HOUR);
    let cp = node.root().join(&id);
    let v = node.json(&["inspect", &id], 0);
    assert_eq!((&v["signature"]["state"], &v["origin"]["source"]), (&Value::from("unsigned"), &Value::from("local")));
    SigningKey::load(Path::new(private)).unwrap().sign_dir(&cp).unwrap();
    write_origin(&cp, &Origin::Import { archive: "/tmp/web.tar".into() }).unwrap();
    let v = node.json(&["inspect", &id], 0);
    assert_eq!(v["verification"]["ok"], true, "{v}");
    assert_eq!(
        (&v["signature"]["state"], &v["signature"]["key_id"]),
        (&Value::from("signed"), &Value::from(key_a.clone()))
    );
    assert_eq!(
        (&v["origin"]["source"], &v["origin"]["archive"]),
        (&Value::from("import"), &Value::from("/tmp/web.tar"))
    );
    let text = stdout(&node.run(&["inspect", &id])).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains(&format!("signature: signed by key {key_a}")), "{text}");
    assert!(text.contains("origin: imported from /tmp/web.tar at "), "{text}");

    let trust = |key: &Path| {
        let root = node.store.root().to_str().unwrap();
        fs::write(
            &node.config,
            format!("[checkpoint]\nroot = {root:?}\n[trust]\nkeys = [{:?}]\n", key.to_str().unwrap()),
        )
        .unwrap();
    };
    trust(&public_b);
    let out = node.run(&["restore", &id, "--pod-annotation"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("signed by key {key_a}, which is not one of this node's trusted keys")), "{err}");
    assert!(err.contains("nothing was created"), "{err}");
    trust(Path::new(public));
    let out = node.run(&["restore", &id, "--pod-annotation"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}
