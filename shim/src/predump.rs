//! Pre-dump rounds of one checkpoint: how many (the request, else the container's annotation,
//! else `[checkpoint] pre_dump_rounds`), whether this node can take them (CRIU's memory dirty
//! tracking, asked once per shim), and running them while the container runs, before the freeze.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use kybernate_checkpoint::predump::{self, DIRTY_TRACK_CHECK, PROBE_TIMEOUT};
use kybernate_checkpoint::{self as criu, DirtyTracking, PreDumpLayout, PRE_DUMP_ANNOTATION};
use log::info;

use crate::container::Container;
use crate::error::CheckpointError;
use crate::restore::spec_annotation;
use crate::runtime::OciRuntime;
use crate::spawn::Spawner;

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Where a checkpoint's round count came from: a node default gives way where pre-dump cannot
/// apply (a paused or GPU container); an explicit request is refused there instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `kybernate checkpoint --pre-dump N` (our field in the checkpoint options).
    Request,
    /// The container's `kybernate.io/checkpoint-pre-dump` annotation.
    Annotation,
    /// `[checkpoint] pre_dump_rounds`.
    Config,
}

/// How many pre-dump rounds a checkpoint takes, and who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreDump {
    pub rounds: u32,
    pub source: Source,
}

/// The rounds for this checkpoint of `c`: `requested`, else the annotation, else the config.
pub fn decide(c: &Container, requested: Option<u32>) -> Result<PreDump> {
    let bad = |message: String| CheckpointError::BadRequest { id: c.id.clone(), message };
    if let Some(rounds) = requested {
        return Ok(PreDump { rounds, source: Source::Request });
    }
    if let Some(value) = spec_annotation(Some(&c.annotations), PRE_DUMP_ANNOTATION) {
        let rounds =
            predump::parse_rounds(&value).map_err(|e| bad(format!("annotation {PRE_DUMP_ANNOTATION}: {e}")))?;
        return Ok(PreDump { rounds, source: Source::Annotation });
    }
    let rounds = predump::check_rounds(u64::from(c.checkpoint_config.pre_dump_rounds))
        .map_err(|e| bad(format!("[checkpoint] pre_dump_rounds: {e}")))?;
    Ok(PreDump { rounds, source: Source::Config })
}

/// Refuses rounds this node cannot take (no soft-dirty bits), before anything is frozen.
pub fn require_dirty_tracking(spawner: &dyn Spawner, c: &Container, criu_path: &Path, p: PreDump) -> Result<()> {
    if p.rounds == 0 {
        return Ok(());
    }
    let tracking = criu::cached_dirty_tracking(criu_path, || probe(spawner, criu_path));
    criu::require_dirty_tracking(p.rounds, criu_path, &tracking).map_err(|source| CheckpointError::Preflight {
        what: "checkpoint",
        id: c.id.clone(),
        source,
    })
}

/// `criu check --feature mem_dirty_track` through the shim's spawner (whose reaper owns every
/// child's exit status), killed if it does not answer in time.
fn probe(spawner: &dyn Spawner, criu_path: &Path) -> DirtyTracking {
    let unknown = |reason: String| DirtyTracking::Unknown { reason };
    // CRIU says "Dirty tracking is OFF" on stderr: a pipe of our own, read after the exit.
    let (err_r, err_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return unknown(format!("cannot make a pipe: {e}")),
    };
    let mut cmd = Command::new(criu_path);
    cmd.args(DIRTY_TRACK_CHECK).stderr(Stdio::from(err_w));
    let started = Instant::now();
    let child = match spawner.start_piped(cmd) {
        Ok(c) => c,
        Err(e) => return unknown(format!("cannot run {}: {e}", criu_path.display())),
    };
    let crate::spawn::PipedChild { stdin, mut stdout, wait, .. } = child;
    drop(stdin);
    // `wait` kills the child after the grace period and waits as long again at most.
    let code = wait(PROBE_TIMEOUT / 2);
    if started.elapsed() >= PROBE_TIMEOUT / 2 && code == 128 + libc::SIGKILL {
        return unknown(format!("`{} {}` did not answer in time", criu_path.display(), DIRTY_TRACK_CHECK.join(" ")));
    }
    // A line or two, already in the pipes: reading after the exit cannot block on CRIU.
    let (mut out, mut err) = (String::new(), String::new());
    let _ = stdout.read_to_string(&mut out);
    let _ = std::fs::File::from(err_r).read_to_string(&mut err);
    criu::parse_dirty_tracking(code, &out, &err)
}

/// Runs the rounds into `layout` with the container running: round `k` into `pre-<k>`, with
/// round `k-1` as its parent. A failed round removes the rounds already taken (the checkpoint is
/// abandoned) and leaves the container running.
pub fn run_rounds(
    runtime: &OciRuntime,
    c: &Container,
    flags: &criu::CheckpointFlags,
    layout: &PreDumpLayout,
    work: &Path,
    recover: impl Fn() -> String,
) -> Result<()> {
    let id = c.id.as_str();
    for k in 1..=layout.rounds {
        let dir = layout.round_dir(k);
        let started = Instant::now();
        let args = flags.pre_dump_args(&dir, work, layout.round_parent(k).as_deref());
        if let Err(e) = runtime.checkpoint(id, &c.bundle, args) {
            layout.remove_rounds();
            // A CRIU killed mid-round may leave the freezer frozen: `recover` thaws it.
            let outcome =
                format!("pre-dump round {k} of {} failed, the rounds taken were removed; {}", layout.rounds, recover());
            return Err(CheckpointError::runtime_failure("checkpoint", id, e, &work.join("dump.log"), outcome));
        }
        info!(
            "container {id}: pre-dump round {k}/{} into {} in {} ms (running)",
            layout.rounds,
            dir.display(),
            started.elapsed().as_millis()
        );
    }
    Ok(())
}

/// The orchestration against a faithful double of runc and CRIU: a fake `runc` that records
/// every call, checks `--parent-path` as runc does (relative, an existing dir beside the images),
/// writes image dirs with CRIU's `parent` link, and fails at any chosen call; and a fake `criu`
/// answering the dirty-tracking check either way. Real CRIU cannot pre-dump on the CI kernel
/// (no soft-dirty bits); its refusal there is tested end to end in the CLI's predump_e2e.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::checkpoint::{CheckpointRequest, Checkpointer};
    use crate::container::RuntimeRecord;
    use crate::process::Process;
    use crate::runtime::{DirectSpawner, RuntimeOpts};
    use crate::spawn::{Capture, PipedChild, RunOutput};

    #[derive(Default)]
    struct FakeRunc {
        /// `runc checkpoint` calls: their arguments between the subcommand and the id.
        checkpoints: Mutex<Vec<Vec<String>>>,
        /// Every call: "program subcommand".
        calls: Mutex<Vec<String>>,
        /// The n-th `runc checkpoint` (1-based) fails after writing part of its images.
        fail_at: Option<usize>,
        /// What the fake CRIU says to the dirty-tracking check.
        dirty_tracking: bool,
        /// Frozen by `runc pause` (or by a CRIU killed mid-dump), until `runc resume`.
        paused: Mutex<bool>,
        /// A directory the dump fills in passing (another writer taking the checkpoint's target).
        occupy: Mutex<Option<PathBuf>>,
    }

    impl FakeRunc {
        fn checkpoint(&self, args: &[String]) -> Result<RunOutput, std::io::Error> {
            let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
            let n = {
                let mut c = self.checkpoints.lock().unwrap();
                c.push(args[..args.len() - 1].to_vec());
                c.len()
            };
            let images = PathBuf::from(flag("--image-path").expect("--image-path"));
            let fail = |msg: String| Ok(RunOutput { code: 1, stdout: vec![], stderr: msg.into_bytes() });
            std::fs::create_dir_all(&images)?;
            if let Some(parent) = flag("--parent-path") {
                // runc's prepareImagePaths, then CRIU's symlinkat(img_parent, images, "parent").
                if Path::new(&parent).is_absolute() {
                    return fail("--parent-path must be relative".into());
                }
                if !images.join(&parent).is_dir() {
                    return fail(format!("invalid --parent-path: {parent}"));
                }
                std::os::unix::fs::symlink(&parent, images.join(predump::PARENT_LINK))?;
            }
            std::fs::write(images.join("pagemap-1.img"), format!("pagemap of call {n}"))?;
            if let Some(dir) = self.occupy.lock().unwrap().take() {
                std::fs::create_dir_all(dir)?;
            }
            if self.fail_at == Some(n) {
                return fail("criu failed: type PRE_DUMP errno 0".into());
            }
            std::fs::write(images.join("pages-1.img"), format!("pages of call {n}"))?;
            if !args.iter().any(|a| a == "--pre-dump") {
                std::fs::write(images.join("inventory.img"), b"inventory")?;
                std::fs::write(images.join("core-1.img"), b"core")?;
            }
            Ok(RunOutput::default())
        }
    }

    impl Spawner for FakeRunc {
        fn run(&self, cmd: Command, _: Option<&[u8]>, _: Capture) -> std::io::Result<RunOutput> {
            let program = Path::new(cmd.get_program()).file_name().unwrap().to_string_lossy().into_owned();
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            // Past runc's global flags (each with a value).
            let mut rest = args.as_slice();
            while let [f, _, tail @ ..] = rest {
                if !["--root", "--log", "--log-format", "--criu"].contains(&f.as_str()) {
                    break;
                }
                rest = tail;
            }
            let sub = rest.first().cloned().unwrap_or_default();
            self.calls.lock().unwrap().push(format!("{program} {sub}"));
            let stdout = match (program.as_str(), sub.as_str()) {
                ("runc", "checkpoint") => return self.checkpoint(&rest[1..]),
                ("runc", "state") => {
                    let status = if *self.paused.lock().unwrap() { "paused" } else { "running" };
                    format!(r#"{{"id":"c1","pid":1,"status":"{status}"}}"#).into_bytes()
                }
                ("runc", "pause") => {
                    *self.paused.lock().unwrap() = true;
                    vec![]
                }
                ("runc", "resume") => {
                    *self.paused.lock().unwrap() = false;
                    vec![]
                }
                ("runc", "ps") => b"[]".to_vec(),
                ("runc", "--version") => b"runc version 1.1.5\n".to_vec(),
                ("criu", "--version") => b"Version: 4.2.1\n".to_vec(),
                _ => vec![],
            };
            Ok(RunOutput { code: 0, stdout, stderr: vec![] })
        }

        /// The dirty-tracking check: the bed's `criu` script, run for real (its stderr into the
        /// probe's pipe, as with the real CRIU).
        fn start_piped(&self, cmd: Command) -> std::io::Result<PipedChild> {
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            assert_eq!(args, DIRTY_TRACK_CHECK, "the only helper the checkpoint starts");
            self.calls.lock().unwrap().push("criu check".into());
            DirectSpawner.start_piped(cmd)
        }
    }

    struct Bed {
        dir: tempfile::TempDir,
        rt: Arc<FakeRunc>,
        c: Container,
    }

    /// A container whose runtime is the fake, with `annotations` and `config_rounds`.
    fn bed(rt: FakeRunc, annotations: serde_json::Value, config_rounds: u32) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        // The fake `criu` answers the dirty-tracking check as CRIU 4.2 does on either kind of
        // kernel; runc's calls never reach it (the fake runc answers them).
        let criu = if rt.dirty_tracking {
            "echo 'mem_dirty_track is supported'"
        } else {
            "echo 'Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.' >&2; exit 1"
        };
        for (bin, script) in [("runc", "exit 99"), ("criu", criu)] {
            let path = dir.path().join(bin);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2", "process": {"args": ["sleep", "inf"], "cwd": "/"},
            "root": {"path": "rootfs"}, "annotations": annotations,
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let rt = Arc::new(rt);
        let opts = RuntimeOpts {
            binary: dir.path().join("runc"),
            root: dir.path().join("root"),
            systemd_cgroup: false,
            criu: Some(dir.path().join("criu")),
            criu_env: vec![],
        };
        let record = RuntimeRecord {
            binary: opts.binary.clone(),
            root: opts.root.clone(),
            systemd_cgroup: false,
            source: "default".into(),
            gpu: false,
            evidence: vec![],
        };
        let init = Arc::new(Process::new("c1".into(), None, Default::default(), None));
        let mut c = Container::new("c1".into(), bundle, OciRuntime::new(opts, rt.clone()), record, init, false);
        c.checkpoint_config.pre_dump_rounds = config_rounds;
        // As the factory does at create.
        c.annotations = kybernate_runtime_select::SpecView::from_value(spec).annotations_only();
        Bed { dir, rt, c }
    }

    impl Bed {
        fn target(&self) -> PathBuf {
            self.dir.path().join("store/ns/c1/cp")
        }

        fn checkpoint(&self, pre_dump: Option<u32>) -> Result<kybernate_checkpoint::Manifest> {
            self.checkpoint_as(pre_dump, false, false)
        }

        /// A checkpoint with `exit`, of a container the client had paused or not.
        fn checkpoint_as(
            &self,
            pre_dump: Option<u32>,
            exit: bool,
            was_paused: bool,
        ) -> Result<kybernate_checkpoint::Manifest> {
            let mut req = CheckpointRequest { image_path: Some(self.target()), pre_dump, ..Default::default() };
            req.flags.exit = exit;
            let cp = Checkpointer { spawner: self.rt.as_ref(), namespace: "ns" };
            cp.checkpoint(&self.c, std::process::id(), &req, &self.target(), was_paused)
        }

        /// The runtime calls after the preflight ones (`criu --version`, `runc ps`).
        fn steps(&self) -> Vec<String> {
            let calls = self.rt.calls.lock().unwrap().clone();
            calls.into_iter().filter(|c| !c.ends_with("--version") && c != "runc ps" && c != "criu check").collect()
        }

        fn checkpoint_args(&self) -> Vec<Vec<String>> {
            self.rt.checkpoints.lock().unwrap().clone()
        }

        /// What is beside the target (no partial dirs may be left).
        fn store_entries(&self) -> Vec<String> {
            let dir = self.target().parent().unwrap().to_path_buf();
            let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
            rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        }
    }

    fn strip_dir(args: &[String], dir: &str) -> Vec<String> {
        args.iter().map(|a| a.replace(dir, "<dir>")).collect::<Vec<_>>().into_iter().map(|a| a.to_string()).collect()
    }

    /// Three rounds, then the final dump: each round's parent is the one before, the final
    /// dump's parent the last; the rounds end up nested under the final images as CRIU's restore
    /// walks them, listed in the manifest, and the checkpoint verifies.
    #[test]
    fn rounds_chain_to_the_final_dump_and_restore_needs_nothing_more() {
        let b = bed(FakeRunc { dirty_tracking: true, ..Default::default() }, serde_json::json!({}), 0);
        let manifest = b.checkpoint(Some(3)).unwrap();
        let calls = b.checkpoint_args();
        assert_eq!(calls.len(), 4, "{calls:?}");
        // The partial dir's name varies: compare the shapes.
        let partial = calls[0][2].trim_end_matches("/pre-1").to_string();
        let shapes: Vec<Vec<String>> = calls.iter().map(|c| strip_dir(c, &partial)).collect();
        let work = b.c.bundle.join("work").display().to_string();
        let round = |k: u32, parent: Option<&str>| {
            let mut v = vec![
                "--pre-dump".to_string(),
                "--image-path".into(),
                format!("<dir>/pre-{k}"),
                "--work-path".into(),
                work.clone(),
            ];
            if let Some(p) = parent {
                v.extend(["--parent-path".to_string(), p.to_string()]);
            }
            v
        };
        assert_eq!(shapes[0], round(1, None));
        assert_eq!(shapes[1], round(2, Some("../pre-1")));
        assert_eq!(shapes[2], round(3, Some("../pre-2")));
        let final_dump: Vec<String> =
            ["--image-path", "<dir>/checkpoint", "--work-path", &work, "--leave-running", "--parent-path", "../pre-3"]
                .map(String::from)
                .to_vec();
        assert_eq!(shapes[3], final_dump);
        // Rounds before the freeze, the final dump frozen.
        let calls = b.rt.calls.lock().unwrap().clone();
        let pause = calls.iter().position(|c| c == "runc pause").expect("frozen for the final dump");
        let checkpoints: Vec<usize> =
            calls.iter().enumerate().filter(|(_, c)| *c == "runc checkpoint").map(|(i, _)| i).collect();
        assert!(checkpoints[..3].iter().all(|&i| i < pause) && checkpoints[3] > pause, "{calls:?}");
        assert_eq!(calls.iter().filter(|c| *c == "criu check").count(), 1);

        // CRIU's restore opens `parent` in each images dir: rounds 3, 2, 1, in that order.
        let target = b.target();
        let mut at = target.join("checkpoint");
        for n in [3, 2, 1] {
            at = at.join(predump::PARENT_LINK);
            assert!(std::fs::symlink_metadata(&at).unwrap().is_dir(), "{} is not a directory", at.display());
            assert_eq!(std::fs::read_to_string(at.join("pages-1.img")).unwrap(), format!("pages of call {n}"));
        }
        assert!(!at.join(predump::PARENT_LINK).exists());
        assert_eq!(std::fs::read_to_string(target.join("checkpoint/pages-1.img")).unwrap(), "pages of call 4");
        for rel in ["checkpoint/parent/pages-1.img", "checkpoint/parent/parent/parent/pagemap-1.img"] {
            assert!(manifest.files.contains_key(rel), "{rel} not in the manifest: {:?}", manifest.files.keys());
        }
        let names: Vec<String> = std::fs::read_dir(&target)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with(predump::PRE_DUMP_PREFIX)), "rounds left beside: {names:?}");
        kybernate_checkpoint::verify(&target).expect("the checkpoint verifies, rounds included");
        // A restore passes only the images dir, as without pre-dump.
        let restore = kybernate_checkpoint::RestoreArgs { images: target.join("checkpoint"), ..Default::default() };
        assert!(!restore.args().iter().any(|a| a.to_string_lossy().contains("parent")));
    }

    /// A failure at any round, or at the final dump, leaves nothing: no rounds, no partial
    /// checkpoint, and the container running (never frozen before the final dump).
    #[test]
    fn a_failure_at_any_round_removes_the_rounds_taken() {
        for fail_at in 1..=3 {
            let rt = FakeRunc { dirty_tracking: true, fail_at: Some(fail_at), ..Default::default() };
            let b = bed(rt, serde_json::json!({}), 0);
            let e = b.checkpoint(Some(2)).unwrap_err().to_string();
            assert_eq!(b.checkpoint_args().len(), fail_at, "stopped at the failure");
            if fail_at <= 2 {
                assert!(e.contains(&format!("pre-dump round {fail_at} of 2 failed")), "{e}");
                assert!(!b.rt.calls.lock().unwrap().iter().any(|c| c == "runc pause"), "frozen for a failed round");
            }
            assert!(e.contains("criu failed"), "{e}");
            assert!(!b.target().exists());
            assert!(b.store_entries().is_empty(), "left after a failure at call {fail_at}: {:?}", b.store_entries());
        }
    }

    /// The rollback guard undoes exactly what was done: a failed dump thaws what the checkpoint
    /// froze and nothing the client froze; a commit that fails with `exit` thaws the container
    /// instead of killing it; a successful leave-running checkpoint thaws once, an `exit` one kills.
    #[test]
    fn a_failed_step_undoes_exactly_what_was_done() {
        let run = |fail_at: Option<usize>, exit: bool, was_paused: bool, block_target: bool| {
            let rt = FakeRunc { fail_at, paused: Mutex::new(was_paused), ..Default::default() };
            let b = bed(rt, serde_json::json!({}), 0);
            if block_target {
                // Taken during the dump: the commit's rename refuses a target that is not empty.
                *b.rt.occupy.lock().unwrap() = Some(b.target().join("someone-elses"));
            }
            let result = b.checkpoint_as(None, exit, was_paused).map(|_| ()).map_err(|e| e.to_string());
            let paused = *b.rt.paused.lock().unwrap();
            let partials = b.store_entries().into_iter().filter(|n| n.contains(".partial-")).count();
            (result, b.steps(), paused, partials)
        };
        // Leave-running, fine: frozen for the dump, thawed before the commit.
        let (r, steps, paused, partials) = run(None, false, false, false);
        assert!(r.is_ok() && !paused && partials == 0, "{r:?}");
        assert_eq!(steps, ["runc pause", "runc checkpoint", "runc state", "runc resume"]);
        // The dump fails: thawed, nothing left.
        let (r, steps, paused, partials) = run(Some(1), false, false, false);
        assert!(r.unwrap_err().contains("criu failed") && !paused && partials == 0);
        assert_eq!(steps, ["runc pause", "runc checkpoint", "runc state", "runc resume"]);
        // The client had paused it: a failed dump leaves it paused.
        let (r, steps, paused, partials) = run(Some(1), true, true, false);
        assert!(r.is_err() && paused && partials == 0);
        assert_eq!(steps, ["runc checkpoint", "runc state"]);
        // `exit`, and the commit fails: thawed and running, never killed.
        let (r, steps, paused, partials) = run(None, true, false, true);
        assert!(r.is_err() && !paused && partials == 0, "{r:?}");
        assert!(!steps.iter().any(|c| c == "runc kill"), "{steps:?}");
        assert_eq!(steps.last().map(String::as_str), Some("runc resume"), "{steps:?}");
        // `exit`, fine: killed after the commit, never thawed before.
        let (r, steps, _, _) = run(None, true, false, false);
        assert!(r.is_ok(), "{r:?}");
        let kill = steps.iter().position(|c| c == "runc kill").expect("killed");
        assert!(!steps[..kill].iter().any(|c| c == "runc resume"), "{steps:?}");
    }

    /// `kybernate checkpoint --pre-dump N` arrives as field 1001 of runc's options.
    #[test]
    fn the_request_field_is_decoded() {
        use containerd_shim::protos::protobuf::well_known_types::any::Any;
        let any = |extra: &[u8]| Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: [&[0x08, 0x01][..], extra].concat(),
            ..Default::default()
        };
        let r = CheckpointRequest::decode("c", Some(&any(&[0xc8, 0x3e, 3]))).unwrap();
        assert!(r.flags.exit);
        assert_eq!(r.pre_dump, Some(3));
        assert_eq!(CheckpointRequest::decode("c", Some(&any(&[0xc8, 0x3e, 0]))).unwrap().pre_dump, Some(0));
        assert_eq!(CheckpointRequest::decode("c", Some(&any(&[]))).unwrap().pre_dump, None);
        let e = CheckpointRequest::decode("c", Some(&any(&[0xc8, 0x3e, 9]))).unwrap_err();
        assert!(e.is_invalid_argument() && e.to_string().contains("more than the 8"), "{e}");
    }

    /// The request beats the annotation, which beats the config; 0 means none.
    #[test]
    fn rounds_come_from_the_request_the_annotation_or_the_config() {
        let ann = serde_json::json!({ PRE_DUMP_ANNOTATION: "2" });
        let b = bed(FakeRunc { dirty_tracking: true, ..Default::default() }, ann.clone(), 5);
        assert_eq!(decide(&b.c, None).unwrap(), PreDump { rounds: 2, source: Source::Annotation });
        assert_eq!(decide(&b.c, Some(0)).unwrap(), PreDump { rounds: 0, source: Source::Request });
        let b = bed(FakeRunc::default(), serde_json::json!({}), 1);
        assert_eq!(decide(&b.c, None).unwrap(), PreDump { rounds: 1, source: Source::Config });
        let b = bed(FakeRunc::default(), serde_json::json!({ PRE_DUMP_ANNOTATION: "lots" }), 0);
        let e = decide(&b.c, None).unwrap_err();
        assert!(e.is_invalid_argument() && e.to_string().contains(PRE_DUMP_ANNOTATION), "{e}");
        let b = bed(FakeRunc::default(), serde_json::json!({}), 99);
        assert!(decide(&b.c, None).unwrap_err().to_string().contains("pre_dump_rounds"));
    }

    /// On a kernel without soft-dirty bits every source is refused before anything is written
    /// or frozen, naming the kernel feature; no pre-dump still checkpoints.
    #[test]
    fn without_dirty_tracking_pre_dump_is_refused_before_anything_happens() {
        for (ann, config, request) in [
            (serde_json::json!({}), 0, Some(2)),
            (serde_json::json!({ PRE_DUMP_ANNOTATION: "1" }), 0, None),
            (serde_json::json!({}), 3, None),
        ] {
            let b = bed(FakeRunc::default(), ann, config);
            let e = b.checkpoint(request).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("CONFIG_MEM_SOFT_DIRTY") && msg.contains("Dirty tracking is OFF"), "{msg}");
            let calls = b.rt.calls.lock().unwrap().clone();
            assert!(!calls.iter().any(|c| c == "runc pause" || c == "runc checkpoint"), "{calls:?}");
            assert!(!b.target().exists() && b.store_entries().is_empty());
        }
        let b = bed(FakeRunc::default(), serde_json::json!({ PRE_DUMP_ANNOTATION: "1" }), 0);
        b.checkpoint(Some(0)).expect("an explicit 0 overrides the annotation");
        assert_eq!(b.checkpoint_args().len(), 1);
        assert!(!b.checkpoint_args()[0].iter().any(|a| a == "--parent-path" || a == "--pre-dump"));
    }
}
