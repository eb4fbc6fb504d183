//! `-info`, containerd 2.x's runtime introspection (shim/src/info.rs), end to end: our answer
//! against the stock `containerd-shim-runc-v2 -info` of containerd 2.1.9 for the same options and
//! the same runc, and what containerd 2.1.9's CRI plugin makes of it for a style (b) handler
//! (`runtime_type = "io.containerd.runc.v2"` + `runtime_path` = our shim): the handler's
//! recursive-read-only-mount and user-namespace support, which the kubelet checks before it runs
//! pods that need them. Style (a) handlers are never introspected (docs/installation.md).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::Options as RuncOptions;
use containerd_shim_protos::types::introspection::RuntimeInfo;
use kybernate_testbed::{Containerd, SYSTEM_PATH};

use common::cri::{cri_bed_with, Setup, Style, HANDLER};
use common::{text, SHIM};

/// The stock shim of containerd 2.1.9 (test/setup.sh unpacks it).
fn stock_shim() -> PathBuf {
    let shim = Containerd::V2.bin_dir().expect("containerd 2.x's bin dir").join("containerd-shim-runc-v2");
    assert!(shim.is_file(), "{} missing: run test/setup.sh first", shim.display());
    shim
}

/// `Any{containerd.runc.v1.Options}` as containerd 2.x writes it to `-info`'s stdin.
fn runc_options(binary_name: &str) -> Vec<u8> {
    let mut o = RuncOptions::new();
    o.binary_name = binary_name.to_string();
    let mut any = Any::new();
    any.type_url = "containerd.runc.v1.Options".into();
    any.value = o.write_to_bytes().expect("encoding runc options");
    any.write_to_bytes().expect("encoding the Any")
}

/// `<shim> -info` with `stdin`, containerd's system PATH, and an empty kybernate config (so a
/// node's /etc/kybernate/config.toml plays no part).
fn info(shim: &Path, stdin: &[u8], dir: &Path) -> Output {
    let config = dir.join("kybernate.toml");
    std::fs::write(&config, "").expect("writing the config");
    let input = dir.join("stdin");
    std::fs::write(&input, stdin).expect("writing stdin");
    Command::new(shim)
        .arg("-info")
        .env_clear()
        .env("PATH", SYSTEM_PATH)
        .env("KYBERNATE_CONFIG", &config)
        .stdin(Stdio::from(std::fs::File::open(&input).expect("opening stdin")))
        .output()
        .unwrap_or_else(|e| panic!("running {} -info: {e}", shim.display()))
}

fn decoded(shim: &Path, out: &Output) -> RuntimeInfo {
    assert!(out.status.success(), "{} -info: {}; stderr: {}", shim.display(), out.status, text(&out.stderr));
    RuntimeInfo::parse_from_bytes(&out.stdout)
        .unwrap_or_else(|e| panic!("{} -info printed no RuntimeInfo: {e}", shim.display()))
}

/// The features document of an answer, as JSON (containerd decodes it with this type URL).
fn features(shim: &Path, info: &RuntimeInfo) -> (String, serde_json::Value) {
    let any = info.features.as_ref().unwrap_or_else(|| panic!("{} -info: no features in {info:?}", shim.display()));
    let doc =
        serde_json::from_slice(&any.value).unwrap_or_else(|e| panic!("{}: features not JSON: {e}", shim.display()));
    (any.type_url.clone(), doc)
}

/// For no options, runc options without `BinaryName`, and `BinaryName = runc`: the same features
/// (type URL and document) and the same options back as the stock shim; for options nobody can
/// read or a runtime that does not exist, a failure with the reason, as the stock shim fails.
#[test]
fn info_answers_as_the_stock_shim_does() {
    let stock = stock_shim();
    let ours = Path::new(SHIM);
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, stdin) in
        [("no options", Vec::new()), ("runc options", runc_options("")), ("BinaryName", runc_options("runc"))]
    {
        let theirs = decoded(&stock, &info(&stock, &stdin, dir.path()));
        let mine = decoded(ours, &info(ours, &stdin, dir.path()));
        assert_eq!(mine.name, "io.containerd.kybernate.v1");
        assert_eq!(theirs.name, "io.containerd.runc.v2");
        assert!(!mine.version.version.is_empty(), "{what}: no version in {mine:?}");
        assert_eq!(features(ours, &mine), features(&stock, &theirs), "{what}: features differ");
        assert_eq!(mine.options, theirs.options, "{what}: options differ");
        let runtime = mine.annotations.get("kybernate.io/oci-runtime");
        assert!(runtime.is_some_and(|r| r.ends_with("/runc")), "{what}: {runtime:?}");
    }

    for (what, stdin, reason) in [
        ("garbage options", b"\x0a\xff".to_vec(), "failed to read runtime options"),
        ("a missing runtime", runc_options("/nonexistent/kbt-runtime"), "/nonexistent/kbt-runtime"),
    ] {
        let theirs = info(&stock, &stdin, dir.path());
        let mine = info(ours, &stdin, dir.path());
        assert!(!theirs.status.success(), "{what}: the stock shim answered");
        assert!(!mine.status.success() && mine.stdout.is_empty(), "{what}: we answered: {mine:?}");
        let stderr = text(&mine.stderr);
        assert!(stderr.contains(reason) && stderr.starts_with("io.containerd.kybernate.v1: "), "{what}: {stderr}");
    }
}

/// containerd 2.1.9's CRI introspects our style (b) handler when it starts: CRI Status reports
/// features for it (none would mean the introspection failed), the same as for its `runc`
/// handler (the stock shim over the same runc 1.1.5), and containerd's debug log shows the
/// introspection ran and did not fail.
#[test]
fn containerd_2_reports_runc_features_for_a_style_b_handler() {
    let b = cri_bed_with(
        Style::RuntimePath,
        Setup { containerd: Containerd::V2, log_level: Some("debug"), ..Setup::default() },
    );
    let status = b.cri.runtime_status(false).unwrap_or_else(|e| panic!("CRI Status: {e}"));
    let handler = |name: &str| {
        status
            .runtime_handlers
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no handler {name:?} in {:?}", status.runtime_handlers))
            .clone()
    };
    let ours = handler(HANDLER);
    let runc = handler("runc");
    let log = std::fs::read_to_string(b.tb.log_path()).expect("containerd's log");
    // logrus quotes the message: `msg="... runtime \"kybernate\" ..."`.
    let quoted = format!("runtime \\\"{HANDLER}\\\"");
    let lines =
        |needle: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(needle) && l.contains(&quoted)).collect() };
    let failed = lines("failed to introspect features of runtime");
    assert!(failed.is_empty(), "introspection of {HANDLER} failed:\n{}", failed.join("\n"));
    let ran = lines("supports CRI userns");
    assert!(!ran.is_empty(), "no introspection of {HANDLER} in containerd's debug log:\n{}", b.tb.log_tail(40));
    assert!(ours.features.is_some(), "no features for {HANDLER} (introspection failed): {:?}", status.runtime_handlers);
    assert_eq!(ours.features, runc.features, "{HANDLER} and runc differ: {:?}", status.runtime_handlers);
    eprintln!("features of {HANDLER}: {:?}", ours.features);
}
