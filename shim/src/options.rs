//! Runtime options containerd sends with a task (and on `start`'s stdin).
//!
//! containerd 1.6 marks them with bare type URLs (`containerd.runc.v1.Options`,
//! `runtimeoptions.v1.Options`), which protobuf's `Any::unpack` does not
//! recognise, so we match the name ourselves.

use std::path::PathBuf;

use crate::io::IoOwner;

use containerd_shim::api::Options as RuncOptions;
use containerd_shim::protos::protobuf::rt::WireType;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::UnknownValueRef;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};

/// `containerd.runc.v1.Options`: what we get when registered as
/// `runtime_type = "io.containerd.runc.v2"` with `runtime_path` (or from a Go client).
pub const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
/// `runtimeoptions.v1.Options`: what CRI sends a custom `runtime_type`.
pub const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// Field number of the deprecated `criu_path` in runc's Options (dropped from
/// the 0.11 protos, still sent by older configs).
const CRIU_PATH_FIELD: u32 = 8;

/// The options that matter to us, whichever message they came in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShimOptions {
    /// Present when containerd sent runc options.
    pub runc: Option<RuncOptions>,
    /// `CriuPath` (runc options field 8), if set.
    pub criu_path: Option<PathBuf>,
    /// `ConfigPath` from `runtimeoptions.v1.Options`, if set.
    pub config_path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("unsupported runtime options type {0:?} (want {RUNC_OPTIONS} or {RUNTIME_OPTIONS})")]
    UnknownType(String),
    #[error("malformed {type_url}: {source}")]
    Decode {
        type_url: String,
        #[source]
        source: containerd_shim::protos::protobuf::Error,
    },
}

impl ShimOptions {
    /// Decodes options from a task's `options` field (absent or empty → defaults).
    pub fn from_any(any: Option<&Any>) -> Result<Self, OptionsError> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty()) else { return Ok(Self::default()) };
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        let decode_err = |source| OptionsError::Decode { type_url: any.type_url.clone(), source };
        match name {
            RUNC_OPTIONS => {
                let o = RuncOptions::parse_from_bytes(&any.value).map_err(decode_err)?;
                let criu_path = match o.special_fields.unknown_fields().get(CRIU_PATH_FIELD) {
                    Some(UnknownValueRef::LengthDelimited(b)) if !b.is_empty() => {
                        Some(PathBuf::from(String::from_utf8_lossy(b).into_owned()))
                    }
                    _ => None,
                };
                Ok(Self { runc: Some(o), criu_path, config_path: None })
            }
            RUNTIME_OPTIONS => {
                let config_path = decode_runtime_options(&any.value).map_err(decode_err)?;
                Ok(Self { config_path: config_path.filter(|p| !p.is_empty()).map(PathBuf::from), ..Self::default() })
            }
            other => Err(OptionsError::UnknownType(other.to_string())),
        }
    }

    /// Decodes what containerd wrote to `start`'s stdin (a marshalled `Any`, or nothing).
    pub fn from_start_stdin(bytes: &[u8]) -> Result<Self, OptionsError> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let any = Any::parse_from_bytes(bytes)
            .map_err(|source| OptionsError::Decode { type_url: "google.protobuf.Any".into(), source })?;
        Self::from_any(Some(&any))
    }

    /// `BinaryName`, if set.
    pub fn binary_name(&self) -> Option<String> {
        self.runc.as_ref().map(|o| o.binary_name.clone()).filter(|s| !s.is_empty())
    }

    /// The runtime's state root: `Root` (default `/run/containerd/runc`) joined with the namespace, as containerd's runc shim does.
    pub fn runtime_root(&self, namespace: &str) -> PathBuf {
        let root =
            self.runc.as_ref().map(|o| o.root.as_str()).filter(|s| !s.is_empty()).unwrap_or("/run/containerd/runc");
        PathBuf::from(root).join(namespace)
    }

    /// Whether runc manages the container's cgroups through systemd (`--systemd-cgroup`), for a
    /// spec whose `linux.cgroupsPath` is `cgroups_path`. Runc options (style (b), Go clients)
    /// decide with `SystemdCgroup`, as for the Go shim. Without them (our runtime type: CRI sends
    /// only `ConfigPath`) the path says it: CRI writes systemd's `slice:prefix:name` when the
    /// kubelet's pod cgroup is a slice (its systemd cgroup driver), a form runc's cgroupfs driver
    /// would take as a directory name inside the shim's own cgroup.
    pub fn systemd_cgroup(&self, cgroups_path: Option<&str>) -> bool {
        match &self.runc {
            Some(o) => o.systemd_cgroup,
            None => cgroups_path.is_some_and(is_systemd_cgroups_path),
        }
    }

    pub fn no_pivot_root(&self) -> bool {
        self.runc.as_ref().is_some_and(|o| o.no_pivot_root)
    }

    pub fn no_new_keyring(&self) -> bool {
        self.runc.as_ref().is_some_and(|o| o.no_new_keyring)
    }

    /// `IoUid`/`IoGid`: who gets the process's stdio pipes. `None` when both
    /// are 0, the runc shim's "no remapping" (a chown to root changes nothing).
    pub fn io_owner(&self) -> Option<IoOwner> {
        let o = self.runc.as_ref()?;
        (o.io_uid != 0 || o.io_gid != 0).then_some(IoOwner { uid: o.io_uid, gid: o.io_gid })
    }

    /// `CriuWorkPath`: where CRIU's work files and logs go unless a checkpoint names its own.
    pub fn criu_work_path(&self) -> Option<PathBuf> {
        self.runc.as_ref().map(|o| o.criu_work_path.as_str()).filter(|s| !s.is_empty()).map(PathBuf::from)
    }

    /// `ShimCgroup`, if set.
    pub fn shim_cgroup(&self) -> Option<&str> {
        self.runc.as_ref().map(|o| o.shim_cgroup.as_str()).filter(|s| !s.is_empty())
    }
}

/// `runtimeoptions.v1.Options { string type_url = 1; string config_path = 2; bytes config_body = 3 (1.7+) }`.
/// Three fields do not justify generated code.
fn decode_runtime_options(bytes: &[u8]) -> Result<Option<String>, containerd_shim::protos::protobuf::Error> {
    let mut is = CodedInputStream::from_bytes(bytes);
    let mut config_path = None;
    while let Some(tag) = is.read_raw_tag_or_eof()? {
        match tag {
            18 => config_path = Some(is.read_string()?),
            t => {
                let wire = WireType::new(t & 7).ok_or_else(|| {
                    containerd_shim::protos::protobuf::Error::from(std::io::Error::other("bad wire type"))
                })?;
                is.skip_field(wire)?
            }
        }
    }
    Ok(config_path)
}

/// runc's systemd form of `cgroupsPath`, `slice:prefix:name`: three fields, the slice empty or a
/// `.slice` unit, a non-empty name. A cgroupfs path (`/kubepods/pod…/<id>`) has no colons.
pub fn is_systemd_cgroups_path(path: &str) -> bool {
    let mut fields = path.split(':');
    match (fields.next(), fields.next(), fields.next(), fields.next()) {
        (Some(slice), Some(_prefix), Some(name), None) => {
            (slice.is_empty() || slice.ends_with(".slice")) && !slice.contains('/') && !name.is_empty()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    fn runtime_options_bytes(config_path: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut os = CodedOutputStream::vec(&mut out);
        os.write_string(1, "io.containerd.kybernate.v1.Options").unwrap();
        os.write_string(2, config_path).unwrap();
        os.write_bytes(3, body).unwrap();
        os.flush().unwrap();
        drop(os);
        out
    }

    #[test]
    fn absent_options_are_defaults() {
        let o = ShimOptions::from_any(None).unwrap();
        assert_eq!(o, ShimOptions::default());
        assert_eq!(o.runtime_root("k8s.io"), PathBuf::from("/run/containerd/runc/k8s.io"));
        assert_eq!(ShimOptions::from_start_stdin(b"").unwrap(), ShimOptions::default());
    }

    #[test]
    fn runc_options_decode_with_bare_type_url() {
        let mut o = RuncOptions::new();
        o.binary_name = "nvidia-container-runtime".into();
        o.root = "/run/kbt".into();
        o.systemd_cgroup = true;
        o.no_pivot_root = true;
        o.shim_cgroup = "/kybernate".into();
        let mut bytes = o.write_to_bytes().unwrap();
        // criu_path = 8 (length-delimited): tag (8 << 3 | 2) = 66
        bytes.extend_from_slice(&[66, 9]);
        bytes.extend_from_slice(b"/opt/criu");
        let s = ShimOptions::from_any(Some(&any(RUNC_OPTIONS, bytes))).unwrap();
        assert_eq!(s.binary_name().as_deref(), Some("nvidia-container-runtime"));
        assert_eq!(s.runtime_root("default"), PathBuf::from("/run/kbt/default"));
        assert!(s.systemd_cgroup(None) && s.no_pivot_root() && !s.no_new_keyring());
        assert_eq!(s.shim_cgroup(), Some("/kybernate"));
        assert_eq!(s.criu_path, Some(PathBuf::from("/opt/criu")));
    }

    #[test]
    fn systemd_cgroups_come_from_runc_options_else_from_the_path() {
        let kubelet = Some("kubepods-besteffort-pod1234_ab.slice:cri-containerd:0123abcd");
        let cgroupfs = Some("/kubepods/besteffort/pod1234/0123abcd");
        // Our runtime type (runtimeoptions, or none at all): the path decides.
        for o in [
            ShimOptions::default(),
            ShimOptions { config_path: Some("/etc/kybernate/config.toml".into()), ..Default::default() },
        ] {
            assert!(o.systemd_cgroup(kubelet));
            assert!(!o.systemd_cgroup(cgroupfs));
            assert!(!o.systemd_cgroup(None));
        }
        // Runc options: SystemdCgroup, whatever the path, as for the Go shim.
        let mut runc = RuncOptions::new();
        let off = ShimOptions { runc: Some(runc.clone()), ..Default::default() };
        assert!(!off.systemd_cgroup(kubelet));
        runc.systemd_cgroup = true;
        let on = ShimOptions { runc: Some(runc), ..Default::default() };
        assert!(on.systemd_cgroup(cgroupfs));
    }

    #[test]
    fn systemd_cgroups_path_form() {
        for yes in ["system.slice:docker:abc", ":cri-containerd:abc", "kubepods.slice::abc", "a-b.slice:p:n"] {
            assert!(is_systemd_cgroups_path(yes), "{yes}");
        }
        for no in [
            "/kubepods/pod1/abc",
            "kubepods/abc",
            "",
            "system.slice:docker",
            "system.slice:docker:",
            "a:b:c:d",
            "/system.slice:docker:abc",
            "notaslice:docker:abc",
        ] {
            assert!(!is_systemd_cgroups_path(no), "{no}");
        }
    }

    #[test]
    fn io_owner_needs_a_non_root_uid_or_gid() {
        assert_eq!(ShimOptions::default().io_owner(), None);
        let with = |uid, gid| {
            let mut o = RuncOptions::new();
            o.io_uid = uid;
            o.io_gid = gid;
            ShimOptions::from_any(Some(&any(RUNC_OPTIONS, o.write_to_bytes().unwrap()))).unwrap().io_owner()
        };
        assert_eq!(with(0, 0), None);
        assert_eq!(with(1234, 5678), Some(IoOwner { uid: 1234, gid: 5678 }));
        assert_eq!(with(1000, 0), Some(IoOwner { uid: 1000, gid: 0 }));
        assert_eq!(with(0, 1000), Some(IoOwner { uid: 0, gid: 1000 }));
    }

    #[test]
    fn prefixed_type_url_is_accepted_too() {
        let s = ShimOptions::from_any(Some(&any("type.googleapis.com/containerd.runc.v1.Options", vec![]))).unwrap();
        assert!(s.runc.is_some());
    }

    #[test]
    fn runtime_options_give_config_path() {
        let bytes = runtime_options_bytes("/etc/kybernate/gpu.toml", b"ignored");
        let s = ShimOptions::from_any(Some(&any(RUNTIME_OPTIONS, bytes.clone()))).unwrap();
        assert_eq!(s.config_path, Some(PathBuf::from("/etc/kybernate/gpu.toml")));
        assert!(s.runc.is_none());
        // As written on start's stdin: a marshalled Any.
        let stdin = any(RUNTIME_OPTIONS, bytes).write_to_bytes().unwrap();
        assert_eq!(
            ShimOptions::from_start_stdin(&stdin).unwrap().config_path,
            Some(PathBuf::from("/etc/kybernate/gpu.toml"))
        );
    }

    #[test]
    fn unknown_type_and_garbage_are_errors() {
        let err = ShimOptions::from_any(Some(&any("example.Options", vec![]))).unwrap_err();
        assert!(err.to_string().contains("example.Options"), "{err}");
        assert!(ShimOptions::from_any(Some(&any(RUNC_OPTIONS, vec![0xff, 0xff, 0xff]))).is_err());
        assert!(ShimOptions::from_any(Some(&any(RUNTIME_OPTIONS, vec![0x12, 0x50]))).is_err());
        assert!(ShimOptions::from_start_stdin(&[0x0a, 0xff]).is_err());
    }
}
