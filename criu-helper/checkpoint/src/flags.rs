//! The flags of `runc checkpoint` and `runc restore`.
//!
//! containerd's checkpoint options arrive as a protobuf; the shim converts them
//! to [`CheckpointFlags`], which is also recorded in the manifest so a restore
//! can repeat what the dump needed (CRIU refuses to restore a dump taken with
//! `--tcp-established` without it, for instance).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Namespaces `--empty-ns` may name (runc's list; only `network` really works).
pub const EMPTY_NS_ALLOWED: [&str; 7] = ["network", "ipc", "uts", "mount", "pid", "user", "cgroup"];
/// Values of `--manage-cgroups-mode` (the empty string means the runtime's default).
pub const CGROUPS_MODES: [&str; 4] = ["soft", "full", "strict", "ignore"];

/// What containerd's `containerd.runc.v1.CheckpointOptions` asks for, in our own type.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CheckpointFlags {
    /// Stop the container after the dump; false → `--leave-running`.
    pub exit: bool,
    /// `--tcp-established`.
    pub open_tcp: bool,
    /// `--ext-unix-sk`.
    pub external_unix_sockets: bool,
    /// `--shell-job`.
    pub terminal: bool,
    /// `--file-locks`.
    pub file_locks: bool,
    /// Each becomes `--empty-ns NS`.
    pub empty_namespaces: Vec<String>,
    /// "" = runtime default; else `--manage-cgroups-mode M`.
    pub cgroups_mode: String,
}

/// A flag value runc would only reject after the container was frozen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagsError {
    #[error("empty namespace {value:?} is not one of {}", EMPTY_NS_ALLOWED.join(", "))]
    EmptyNamespace { value: String },
    #[error("cgroups mode {value:?} is not one of soft, full, strict, ignore (or empty for the runtime default)")]
    CgroupsMode { value: String },
}

impl CheckpointFlags {
    /// Rejects values runc would reject late, after the container was paused.
    pub fn validate(&self) -> Result<(), FlagsError> {
        if let Some(bad) = self.empty_namespaces.iter().find(|ns| !EMPTY_NS_ALLOWED.contains(&ns.as_str())) {
            return Err(FlagsError::EmptyNamespace { value: bad.clone() });
        }
        if !self.cgroups_mode.is_empty() && !CGROUPS_MODES.contains(&self.cgroups_mode.as_str()) {
            return Err(FlagsError::CgroupsMode { value: self.cgroups_mode.clone() });
        }
        Ok(())
    }

    /// Arguments of `runc checkpoint` after the subcommand and before the container id:
    /// `--image-path IMAGES --work-path WORK [--leave-running] [--tcp-established] [--ext-unix-sk]
    /// [--shell-job] [--file-locks] [--empty-ns NS]... [--manage-cgroups-mode M]`.
    pub fn checkpoint_args(&self, images: &Path, work: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--image-path".into(), images.into(), "--work-path".into(), work.into()];
        if !self.exit {
            args.push("--leave-running".into());
        }
        self.push_shared(&mut args, true);
        args
    }

    /// Arguments of one pre-dump round (`runc checkpoint --pre-dump`): `--pre-dump --image-path
    /// ROUND --work-path WORK [--parent-path P]` and the same flags as the final dump, which CRIU
    /// needs to walk the same process tree; never `--leave-running` (a pre-dump always does).
    /// `parent` is relative to `images`, as runc requires.
    pub fn pre_dump_args(&self, images: &Path, work: &Path, parent: Option<&Path>) -> Vec<OsString> {
        let mut args: Vec<OsString> =
            vec!["--pre-dump".into(), "--image-path".into(), images.into(), "--work-path".into(), work.into()];
        args.extend(crate::predump::parent_args(parent));
        self.push_shared(&mut args, true);
        args
    }

    /// The flags dump and restore share; `--empty-ns` only exists on checkpoint.
    fn push_shared(&self, args: &mut Vec<OsString>, with_empty_ns: bool) {
        for (on, flag) in [
            (self.open_tcp, "--tcp-established"),
            (self.external_unix_sockets, "--ext-unix-sk"),
            (self.terminal, "--shell-job"),
            (self.file_locks, "--file-locks"),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        if with_empty_ns {
            for ns in &self.empty_namespaces {
                args.extend(["--empty-ns".into(), ns.into()]);
            }
        }
        if !self.cgroups_mode.is_empty() {
            args.extend(["--manage-cgroups-mode".into(), (&self.cgroups_mode).into()]);
        }
    }
}

/// Flags of `runc restore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreArgs {
    pub images: PathBuf,
    pub work: PathBuf,
    pub bundle: PathBuf,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    /// The flags the checkpoint was taken with (from the manifest; default when unknown):
    /// open_tcp → --tcp-established, external_unix_sockets → --ext-unix-sk, terminal → --shell-job,
    /// file_locks → --file-locks, cgroups_mode → --manage-cgroups-mode. (exit / empty_namespaces do not apply to restore.)
    pub flags: CheckpointFlags,
}

impl RestoreArgs {
    /// `runc restore` arguments after the subcommand, before the id:
    /// `--detach --no-subreaper --bundle B --pid-file P --image-path I --work-path W
    /// [--console-socket S] [--no-pivot] [--tcp-established] [--ext-unix-sk] [--shell-job] [--file-locks]
    /// [--manage-cgroups-mode M]`.
    pub fn args(&self) -> Vec<OsString> {
        // --detach: the shim reaps the restored init itself (--no-subreaper keeps runc out of the way).
        let mut args: Vec<OsString> = vec![
            "--detach".into(),
            "--no-subreaper".into(),
            "--bundle".into(),
            (&self.bundle).into(),
            "--pid-file".into(),
            (&self.pid_file).into(),
            "--image-path".into(),
            (&self.images).into(),
            "--work-path".into(),
            (&self.work).into(),
        ];
        if let Some(sock) = &self.console_socket {
            args.extend(["--console-socket".into(), sock.into()]);
        }
        if self.no_pivot {
            args.push("--no-pivot".into());
        }
        self.flags.push_shared(&mut args, false);
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn checkpoint_args_default_leave_running() {
        let f = CheckpointFlags::default();
        let got = strs(f.checkpoint_args(Path::new("/c/checkpoint"), Path::new("/w")));
        assert_eq!(got, ["--image-path", "/c/checkpoint", "--work-path", "/w", "--leave-running"]);
    }

    #[test]
    fn checkpoint_args_everything_in_order() {
        let f = CheckpointFlags {
            exit: true,
            open_tcp: true,
            external_unix_sockets: true,
            terminal: true,
            file_locks: true,
            empty_namespaces: vec!["network".into(), "ipc".into()],
            cgroups_mode: "soft".into(),
        };
        f.validate().unwrap();
        let got = strs(f.checkpoint_args(Path::new("/i"), Path::new("/w")));
        let want = [
            "--image-path",
            "/i",
            "--work-path",
            "/w",
            "--tcp-established",
            "--ext-unix-sk",
            "--shell-job",
            "--file-locks",
            "--empty-ns",
            "network",
            "--empty-ns",
            "ipc",
            "--manage-cgroups-mode",
            "soft",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn pre_dump_args_chain_to_their_parent() {
        let f = CheckpointFlags { exit: true, open_tcp: true, ..Default::default() };
        let first = strs(f.pre_dump_args(Path::new("/c/pre-1"), Path::new("/w"), None));
        assert_eq!(first, ["--pre-dump", "--image-path", "/c/pre-1", "--work-path", "/w", "--tcp-established"]);
        let second = strs(f.pre_dump_args(Path::new("/c/pre-2"), Path::new("/w"), Some(Path::new("../pre-1"))));
        assert_eq!(
            second,
            [
                "--pre-dump",
                "--image-path",
                "/c/pre-2",
                "--work-path",
                "/w",
                "--parent-path",
                "../pre-1",
                "--tcp-established"
            ]
        );
    }

    #[test]
    fn restore_args_minimal_and_full() {
        let mut r = RestoreArgs {
            images: "/i".into(),
            work: "/w".into(),
            bundle: "/b".into(),
            pid_file: "/b/init.pid".into(),
            ..Default::default()
        };
        let base = [
            "--detach",
            "--no-subreaper",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--image-path",
            "/i",
            "--work-path",
            "/w",
        ];
        assert_eq!(strs(r.args()), base);

        r.console_socket = Some("/run/c.sock".into());
        r.no_pivot = true;
        r.flags = CheckpointFlags {
            exit: true,
            open_tcp: true,
            external_unix_sockets: true,
            terminal: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            cgroups_mode: "full".into(),
        };
        let mut want: Vec<&str> = base.to_vec();
        want.extend([
            "--console-socket",
            "/run/c.sock",
            "--no-pivot",
            "--tcp-established",
            "--ext-unix-sk",
            "--shell-job",
            "--file-locks",
            "--manage-cgroups-mode",
            "full",
        ]);
        assert_eq!(strs(r.args()), want);
    }

    #[test]
    fn validate_rejects_unknown_values() {
        let f = CheckpointFlags { empty_namespaces: vec!["network".into(), "time".into()], ..Default::default() };
        let err = f.validate().unwrap_err();
        assert_eq!(err, FlagsError::EmptyNamespace { value: "time".into() });
        assert!(err.to_string().contains("\"time\"") && err.to_string().contains("network, ipc"), "{err}");

        let f = CheckpointFlags { cgroups_mode: "hard".into(), ..Default::default() };
        let err = f.validate().unwrap_err();
        assert!(err.to_string().contains("\"hard\"") && err.to_string().contains("strict"), "{err}");

        for mode in ["", "soft", "full", "strict", "ignore"] {
            CheckpointFlags { cgroups_mode: mode.into(), ..Default::default() }.validate().unwrap();
        }
    }

    #[test]
    fn flags_deserialize_with_defaults() {
        let f: CheckpointFlags = serde_json::from_str(r#"{"open_tcp":true}"#).unwrap();
        assert_eq!(f, CheckpointFlags { open_tcp: true, ..Default::default() });
    }
}
