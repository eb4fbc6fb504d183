//! `kybernate`: the SRE's command line for Kybernate's checkpoints.
//!
//! The store commands work on the node's checkpoint store only (list, inspect,
//! rm, prune, export, import); checkpoint, restore and doctor go through
//! containerd's API. Exit codes: 0 ok, 1 the operation failed,
//! 2 usage or bad input. Errors are one line on stderr:
//! `kybernate: <what was wrong>; <what to do next>`.

mod checkpoint;
mod commands;
mod containerd;
mod containerd_config;
mod cuda_checkpoint;
mod doctor;
mod error;
mod metrics;
mod output;
mod pods;
mod progress;
mod registry;
mod restore;
mod signing;
mod store;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use kybernate_checkpoint::retention::RetentionPolicy;

use crate::error::CliError;
use crate::output::Output;

/// Long help examples, shown by `kybernate --help`.
const EXAMPLES: &str = "\
Examples:
  kybernate checkpoint web                        checkpoint a running container, leave it running
  kybernate list                                  every checkpoint on this node, newest first
  kybernate -n k8s.io list --container web        one container's checkpoints
  kybernate inspect k8s.io/web/20261123T212501.123Z
  kybernate prune --keep 3 --dry-run              what keeping 3 per container would remove
  kybernate export k8s.io/web/20261123T212501.123Z /tmp/web.tar
  kybernate -o json list | jq '.[].id'";

/// Manage Kybernate's checkpoints on this node.
///
/// Checkpoints live in the store named by `[checkpoint] root` in the Kybernate config
/// (default /var/lib/kybernate/checkpoints) as <namespace>/<container>/<timestamp>/.
/// A CHECKPOINT is its id from `kybernate list` (the path relative to the store) or a path to
/// its directory; either way it must lie inside the store.
#[derive(Debug, Parser)]
#[command(name = "kybernate", version, verbatim_doc_comment, after_long_help = EXAMPLES)]
struct Cli {
    /// Kybernate config file [default: $KYBERNATE_CONFIG, else /etc/kybernate/config.toml].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output format: a table for people, JSON for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// containerd namespace: only its checkpoints (list, prune; unset: every namespace), or the
    /// container's namespace (checkpoint; unset: k8s.io if containerd has it, else default), or
    /// where a restored container is created (restore; unset: the checkpoint's namespace), or
    /// where a kubelet/crictl/Podman archive's checkpoint is stored (import; unset: k8s.io).
    #[arg(short, long, global = true, env = "CONTAINERD_NAMESPACE", value_name = "NS")]
    namespace: Option<String>,
    /// containerd's socket, for the containerd-facing commands (checkpoint).
    #[arg(
        long,
        global = true,
        env = "CONTAINERD_ADDRESS",
        value_name = "SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint a running container of Kybernate's runtime into the store, through containerd.
    #[command(
        group(ArgGroup::new("after").args(["leave_running", "exit"])),
        after_long_help = "\
Examples:
  kybernate checkpoint web                          leave it running (the default)
  kybernate -n k8s.io checkpoint web --exit         stop it after the checkpoint
  kybernate checkpoint web --name before-upgrade    <ns>/web/before-upgrade instead of a timestamp
  kybernate checkpoint web -o json
  kybernate checkpoint web --pre-dump 2             copy memory twice while it runs, then dump the rest frozen

The container must run under io.containerd.kybernate.v1 and its task must be running. The checkpoint
lands in <root>/<namespace>/<container>/<timestamp or NAME>/; a NAME that exists is refused."
    )]
    Checkpoint {
        /// containerd container id (for Kubernetes: the container's id from `crictl ps`, or use --pod).
        #[arg(required_unless_present = "pod", conflicts_with = "pod")]
        container: Option<String>,
        /// Kubernetes pod whose container to checkpoint (with --container; found by CRI's labels).
        #[arg(long, value_name = "NAME", requires = "pod_container")]
        pod: Option<String>,
        /// The pod's Kubernetes namespace.
        #[arg(long, value_name = "NS", default_value = pods::DEFAULT_POD_NAMESPACE, requires = "pod")]
        pod_namespace: String,
        /// The container's name in the pod (with --pod).
        #[arg(long = "container", id = "pod_container", value_name = "NAME", requires = "pod")]
        pod_container: Option<String>,
        /// Leave the container running after the checkpoint (the default).
        #[arg(long)]
        leave_running: bool,
        /// Stop the container after the checkpoint.
        #[arg(long)]
        exit: bool,
        /// Checkpoint established TCP connections (CRIU's --tcp-established).
        #[arg(long)]
        tcp: bool,
        /// The checkpoint's directory name instead of the timestamp.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Pre-dump rounds: copy the container's memory N times while it runs, so that only the
        /// last changes are dumped frozen (0 = none; unset: the container's
        /// kybernate.io/checkpoint-pre-dump annotation, else [checkpoint] pre_dump_rounds). Needs a
        /// kernel with soft-dirty bits (CONFIG_MEM_SOFT_DIRTY); refused otherwise.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=kybernate_checkpoint::MAX_PRE_DUMP_ROUNDS as i64))]
        pre_dump: Option<u32>,
    },
    /// List every checkpoint in the store, newest first (broken ones too, with the reason).
    #[command(after_long_help = "\
Examples:
  kybernate list
  kybernate list --namespace k8s.io --container web
  kybernate list -o json

STATUS is \"ok\" when the manifest is readable and every file it lists is present with its
recorded size; checksums are only checked by `kybernate inspect`.")]
    List {
        /// Only checkpoints of this container id.
        #[arg(long, value_name = "ID")]
        container: Option<String>,
    },
    /// Show one checkpoint's manifest and verify every file's checksum, or (--compat) whether
    /// this node can restore it.
    #[command(after_long_help = "\
Examples:
  kybernate inspect k8s.io/web/20261123T212501.123Z
  kybernate inspect /var/lib/kybernate/checkpoints/k8s.io/web/20261123T212501.123Z -o json
  kybernate inspect --compat k8s.io/web/20261123T212501.123Z        can this node restore it?
  kybernate inspect --compat k8s.io/web/20261123T212501.123Z -o json
      {\"compatible\": false, \"mismatches\": [{\"code\", \"message\", \"checkpoint\", \"node\"}], \"warnings\": [...]}

Exits 1 when verification fails (the checkpoint must not be restored); the details are still printed.
--compat compares the manifest with this node and with the container its spec.dump describes (CRIU
version and CUDA plugin, kernel, architecture, CPU features, cgroup mode, external mounts, GPU
models, count, driver), hashes nothing, and exits 1 when any hard mismatch is found; warnings
(a newer CRIU, kernel or driver) do not fail it. See docs/gpu.md, \"Restore verdict\".")]
    Inspect {
        /// Checkpoint id (from `kybernate list`) or directory.
        checkpoint: String,
        /// Print the restore verdict for this node instead of the manifest (no hashing).
        #[arg(long)]
        compat: bool,
    },
    /// Remove checkpoints, and their container and namespace directories once empty.
    #[command(after_long_help = "\
Examples:
  kybernate rm k8s.io/web/20261123T212501.123Z
  kybernate rm k8s.io/web/20261123T212501.123Z k8s.io/web/20261124T080000.000Z

Every CHECKPOINT is checked before anything is removed: one unknown id removes nothing.")]
    Rm {
        /// Checkpoint ids (from `kybernate list`) or directories.
        #[arg(required = true, value_name = "CHECKPOINT")]
        checkpoints: Vec<String>,
    },
    /// Remove old checkpoints, per container: all but the newest N, or those older than a duration;
    /// without either, what the config's [checkpoint] keep and max_bytes give up.
    #[command(
        group(ArgGroup::new("rule").args(["keep", "older_than"])),
        after_long_help = "\
Examples:
  kybernate prune --dry-run                    what the config's keep and max_bytes would remove
  kybernate prune --keep 3 --dry-run           keep the 3 newest of every container, show what goes
  kybernate prune --older-than 7d              remove checkpoints created more than 7 days ago
  kybernate prune --older-than 12h --namespace k8s.io --container web

Broken checkpoints count like any other, by the time in their manifest or else in their directory name.
Without --keep or --older-than, the node's retention policy applies, as after every checkpoint the
shim takes: [checkpoint] keep per container, then [checkpoint] max_bytes for the whole store (broken
ones first, then pulled, imported and local ones, oldest first; never a container's newest checkpoint
taken on this node). --namespace and --container narrow what is removed."
    )]
    Prune {
        /// Keep the newest N checkpoints of each container (N ≥ 1; use `kybernate rm` to remove all).
        #[arg(long, value_name = "N", value_parser = parse_keep)]
        keep: Option<usize>,
        /// Remove checkpoints older than this (e.g. 7d, 12h, 30m).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Only checkpoints of this container id.
        #[arg(long, value_name = "ID")]
        container: Option<String>,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write one checkpoint to a tar archive (checkpointctl layout) for another node.
    #[command(after_long_help = "\
Examples:
  kybernate export k8s.io/web/20261123T212501.123Z /tmp/web.tar
  kybernate export --compress zstd k8s.io/web/20261123T212501.123Z /tmp/web.tar.zst

The checkpoint is verified first. The archive holds process memory: treat it like a secret. FILE
must not exist and must lie outside the store. Without --compress, the config's [checkpoint]
compress decides (default none: on a local disk a plain tar is the fastest; zstd pays on the
network and on slow disks, see docs/benchmarks.md).")]
    Export {
        /// Checkpoint id (from `kybernate list`) or directory.
        checkpoint: String,
        /// The archive to write.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Compress the tar with zstd, or not (default: the config's [checkpoint] compress).
        #[arg(long, value_enum, value_name = "HOW")]
        compress: Option<commands::Compress>,
    },
    /// Add a checkpoint archive (from `kybernate export`, the kubelet, crictl or Podman) to this node's store.
    #[command(after_long_help = "\
Examples:
  kybernate import /tmp/web.tar
  kybernate import /var/lib/kubelet/checkpoints/checkpoint-web_team-a-web-2026-11-24T05:28:41Z.tar

Plain and zstd-compressed tars are read alike (zstd is known by its first bytes). Only plain
files and directories are accepted, and the result must verify; otherwise nothing is left in the
store. An archive of `kybernate export` keeps the namespace and container of its manifest. A
kubelet/crictl/Podman checkpoint archive (no manifest of ours) is checked (CRIU's images, its
config.dump and spec.dump) and gets a generated manifest: stored under --namespace (default
k8s.io), container and pod from CRI's files. Every import is marked as imported (kybernate.origin);
with [trust] keys set and signatures required, unsigned archives (kubelet ones always) are refused.")]
    Import {
        /// The archive to read.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Restore a checkpoint as a new container through containerd, or print its pod annotation.
    #[command(after_long_help = "\
Examples:
  kybernate restore default/web/20261123T212501.123Z                   as web-restored-<unix seconds>
  kybernate restore default/web/20261123T212501.123Z --as web2 --image docker.io/library/nginx:1
  kybernate restore default/web/20261123T212501.123Z --dry-run         check, create nothing
  kybernate restore default/web/20261123T212501.123Z --spec web.json   from a spec you trust
  kybernate restore k8s.io/<id>/20261123T212501.123Z --pod-annotation  for a Kubernetes pod instead

The checkpoint is verified first. The new container is created from the checkpoint's spec.dump
(or --spec FILE); whatever that spec grants beyond the image defaults (capabilities, host
namespaces, host mounts, devices, no seccomp, hooks, a CRIU config file, ...) is listed, and
refused (exit 2) unless --trust-spec: spec.dump is as trustworthy as whoever could write the
checkpoint. The checkpoint's processes must need nothing beyond that spec (the credentials check,
also run by the shim). The container runs under io.containerd.kybernate.v1 in the checkpoint's
containerd namespace (or -n), on a fresh snapshot of the image; the shim applies the checkpoint's
rootfs changes and restores the processes at Start.")]
    Restore {
        /// Checkpoint id (from `kybernate list`) or directory, or `oci://REF` to pull it first
        /// (`kybernate pull`'s checks; [registry] in the config).
        checkpoint: String,
        /// The new container's id [default: <container>-restored-<unix seconds>].
        #[arg(long = "as", value_name = "NEW_ID", conflicts_with = "pod_annotation")]
        new_id: Option<String>,
        /// The image whose snapshot becomes the rootfs [default: the image the manifest records].
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
        /// Print the pod annotation (and a pod snippet) that restores it under Kubernetes; create nothing.
        #[arg(long)]
        pod_annotation: bool,
        /// Restore a GPU checkpoint onto GPUs of another model or count (the CUDA restore may
        /// then fail in the driver).
        #[arg(long)]
        allow_gpu_mismatch: bool,
        /// Create the container from this OCI runtime spec (config.json) instead of the
        /// checkpoint's spec.dump.
        #[arg(long, value_name = "FILE", conflicts_with = "pod_annotation")]
        spec: Option<PathBuf>,
        /// Create it although the spec grants more than the image defaults (listed first).
        #[arg(long, conflicts_with = "pod_annotation")]
        trust_spec: bool,
        /// Verify and check, print what the restore would do; create nothing. Exit 0 if it would
        /// go ahead, 2 if it would be refused.
        #[arg(long, conflicts_with = "pod_annotation")]
        dry_run: bool,
    },
    /// Check whether this node is ready for Kybernate: containerd, the shim, runc, CRIU, GPU, store.
    #[command(after_long_help = "\
Examples:
  kybernate doctor
  kybernate doctor --containerd-config /etc/containerd/config.toml -o json
  kybernate doctor --checkpoint k8s.io/web/20261123T212501.123Z   before moving it here

Each check prints ok, warn or fail, what it found and, for warn and fail, the fix.
With --checkpoint, one more check: the restore verdict of that checkpoint on this node
(as `kybernate inspect --compat`). Exits 1 when a check failed, else 0.")]
    Doctor {
        /// containerd's config file, to find our runtime's registration for Kubernetes (CRI).
        #[arg(long, value_name = "PATH", default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// Also judge whether this node can restore this checkpoint (id or directory in the store).
        #[arg(long, value_name = "CHECKPOINT")]
        checkpoint: Option<String>,
    },
    /// Print Prometheus metrics of this node's checkpoints and restores, or serve them over HTTP.
    #[command(after_long_help = "\
Examples:
  kybernate metrics                               the text exposition, once
  kybernate metrics -o json                       the same numbers as JSON
  kybernate metrics --listen :9474                serve http://<node>:9474/metrics (Ctrl-C stops)
  kybernate metrics --listen 127.0.0.1:9474

Computed from the attempt journal in the store (<root>/.journal/), which the shim appends to
for every checkpoint and restore, failed ones too.")]
    Metrics {
        /// Serve the metrics at http://ADDR/metrics instead of printing them (HOST:PORT or :PORT).
        #[arg(long, value_name = "ADDR", value_parser = metrics::parse_listen)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Drop-in for NVIDIA's cuda-checkpoint over the CUDA driver API (for CRIU's CUDA plugin).
    #[command(
        name = "cuda-checkpoint",
        after_long_help = "\
Examples:
  kybernate cuda-checkpoint --get-state --pid 4711
  kybernate cuda-checkpoint --action lock --pid 4711 --timeout 10000
  kybernate cuda-checkpoint --toggle --pid 4711

Output is NVIDIA's (CRIU parses it); --output does not apply. The driver library is the config's
[checkpoint] libcuda. Linked as `cuda-checkpoint`, kybernate runs this command:
  ln -s /usr/local/bin/kybernate /usr/local/bin/cuda-checkpoint"
    )]
    CudaCheckpoint(cuda_checkpoint::Args),
    /// Register Kybernate's runtime in containerd's config.toml (for a RuntimeClass), or remove it.
    #[command(name = "containerd-config", after_long_help = containerd_config::EXAMPLES)]
    ContainerdConfig(containerd_config::Args),
    /// Generate a key pair to sign checkpoints with ([checkpoint] signing_key) and to trust
    /// them by ([trust] keys on the nodes that restore).
    #[command(after_long_help = "\
Examples:
  kybernate keygen /etc/kybernate/keys              writes kybernate.key (0600) and kybernate.pub
  kybernate keygen /etc/kybernate/keys --force      replaces an existing key pair
  kybernate keygen /etc/kybernate/keys -o json      {\"private\": …, \"public\": …, \"key_id\": …}

Prints the key id (sha256:<16 hex digits> of the public key), which refusals and
`kybernate inspect` name. Distribute kybernate.pub only; the private key stays on the signing node.")]
    Keygen {
        /// Directory for kybernate.key and kybernate.pub (created 0700 if missing).
        dir: PathBuf,
        /// Replace an existing kybernate.key (checkpoints signed by it then need its old public key to verify).
        #[arg(long)]
        force: bool,
    },
    /// Upload a checkpoint from the store to an OCI registry, as a checkpoint image.
    #[command(after_long_help = "\
Examples:
  kybernate push k8s.io/web/20261123T212501.123Z registry.example:5000/ckpt/web:latest
  kybernate push default/web/before-upgrade 127.0.0.1:5000/web:v1 --plain-http -o json

Layers the registry already holds (an unchanged large file of an earlier push of the same tag)
are not uploaded again. Credentials, CAs and plain-HTTP registries: the config's [registry].
The image holds process memory: treat the repository like a secret.")]
    Push {
        /// Checkpoint id (from `kybernate list`) or directory.
        checkpoint: String,
        /// Where to push: host[:port]/repository:tag (`oci://` optional).
        #[arg(value_name = "REF")]
        reference: String,
        /// Speak plain HTTP to this registry (else HTTPS unless [registry] insecure lists it).
        #[arg(long)]
        plain_http: bool,
    },
    /// Download a checkpoint image into the store, verified and trust-checked.
    #[command(after_long_help = "\
Examples:
  kybernate pull registry.example:5000/ckpt/web:latest
  kybernate pull 127.0.0.1:5000/web@sha256:<digest> --plain-http -o json
  kybernate pull registry.example:5000/ckpt/web:latest --namespace k8s.io

Every layer is checked against its digest and every file against kybernate.json before the
checkpoint appears in the store; [trust] decides whether unsigned ones are accepted. A digest the
store already holds downloads nothing. Images the checkpoint names (its base image) are never
pulled.")]
    Pull {
        /// What to pull: host[:port]/repository:tag or …@sha256:<digest> (`oci://` optional).
        #[arg(value_name = "REF")]
        reference: String,
        /// Speak plain HTTP to this registry (else HTTPS unless [registry] insecure lists it).
        #[arg(long)]
        plain_http: bool,
    },
    /// Print a shell completion script.
    #[command(after_long_help = "\
Examples:
  kybernate completions bash > /etc/bash_completion.d/kybernate
  kybernate completions zsh > \"${fpath[1]}/_kybernate\"
  kybernate completions fish > ~/.config/fish/completions/kybernate.fish")]
    Completions {
        /// The shell to write the script for.
        shell: clap_complete::Shell,
    },
}

/// `--keep N`: at least 1, so that a typo cannot empty the store.
fn parse_keep(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (to remove every checkpoint, use `kybernate rm`)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number of checkpoints to keep, e.g. 3".into()),
    }
}

/// humantime's durations ("7d", "12h", "1h 30m") for `--older-than`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 7d, 12h, 30m)"))
}

fn main() -> ExitCode {
    // Started through a `cuda-checkpoint` symlink (by CRIU's CUDA plugin): NVIDIA's command line.
    if let Some(code) = cuda_checkpoint::main_by_argv0() {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: print, exit 0
        Err(e) => {
            eprintln!("kybernate: {}", output::printable(&error::usage_line(&e)));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kybernate: {}", output::printable(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, CliError> {
    if let Command::Completions { shell } = cli.command {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "kybernate", &mut out);
        std::io::stdout().write_all(&out).map_err(CliError::Stdout)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::CudaCheckpoint(args) = &cli.command {
        return cuda_checkpoint::run(cli.config.as_deref(), args);
    }
    // Before the store: it edits containerd's config, and its --config is containerd's file.
    if let Command::ContainerdConfig(args) = &cli.command {
        return containerd_config::run(cli.output, args);
    }
    // Needs no store: a key pair may be made anywhere, on any machine.
    if let Command::Keygen { dir, force } = &cli.command {
        return signing::keygen(cli.output, dir, *force);
    }
    let store = store::open(cli.config.as_deref())?;
    let ns = cli.namespace.as_deref().filter(|s| !s.is_empty());
    let out = cli.output;
    match cli.command {
        Command::Checkpoint {
            container,
            pod,
            pod_namespace,
            pod_container,
            leave_running: _,
            exit,
            tcp,
            name,
            pre_dump,
        } => {
            let pod = pod.map(|pod| pods::PodContainer {
                pod,
                pod_namespace,
                container: pod_container.unwrap_or_default(), // clap: --pod requires --container
            });
            let signing_key = store::load_config(cli.config.as_deref())?.checkpoint.signing_key;
            let args = checkpoint::Args {
                container: container.unwrap_or_default(),
                pod,
                exit,
                tcp,
                name,
                pre_dump,
                signing_key,
            };
            checkpoint::checkpoint(&store, out, &cli.address, ns, &args)
        }
        Command::List { container } => commands::list(&store, out, ns, container.as_deref()),
        Command::Inspect { checkpoint, compat: false } => commands::inspect(&store, out, &checkpoint),
        Command::Inspect { checkpoint, compat: true } => {
            let cdi_dirs = store::load_config(cli.config.as_deref())?.checkpoint.cdi_spec_dirs;
            commands::inspect_compat(&store, out, &checkpoint, &cdi_dirs)
        }
        Command::Rm { checkpoints } => commands::rm(&store, out, &checkpoints),
        Command::Prune { keep, older_than, container, dry_run } => {
            let rule = match (keep, older_than) {
                (Some(n), _) => commands::Rule::Keep(n),
                (None, Some(d)) => commands::Rule::OlderThan(d),
                (None, None) => {
                    let config = store::load_config(cli.config.as_deref())?.checkpoint;
                    let policy = RetentionPolicy::new(config.keep, config.max_bytes);
                    if policy.is_unlimited() {
                        return Err(CliError::Usage(
                            "prune needs --keep or --older-than, or a retention policy in the config \
                             ([checkpoint] keep, max_bytes)"
                                .into(),
                        ));
                    }
                    commands::Rule::Policy(policy)
                }
            };
            commands::prune(&store, out, ns, container.as_deref(), rule, dry_run)
        }
        Command::Export { checkpoint, file, compress } => {
            let compress = match compress {
                Some(c) => c,
                None => store::load_config(cli.config.as_deref())?.checkpoint.compress.into(),
            };
            commands::export(&store, out, &checkpoint, &file, compress)
        }
        Command::Import { file } => {
            let trust = store::load_config(cli.config.as_deref())?.trust;
            commands::import(&store, out, &file, ns, &trust)
        }
        Command::Restore {
            checkpoint,
            new_id,
            image,
            pod_annotation,
            allow_gpu_mismatch,
            spec,
            trust_spec,
            dry_run,
        } => {
            let config = store::load_config(cli.config.as_deref())?;
            // `oci://REF`: pulled into the store first (verified, trust-checked), then restored.
            let checkpoint = if registry::is_oci(&checkpoint) {
                let reference = registry::parse_reference(&checkpoint)?;
                registry::pull_into_store(&store, &config, &reference, false, ns, &mut |_| {})?.0.id
            } else {
                checkpoint
            };
            let (cdi_spec_dirs, trust) = (config.checkpoint.cdi_spec_dirs, config.trust);
            let args = restore::Args {
                checkpoint,
                new_id,
                image,
                pod_annotation,
                allow_gpu_mismatch,
                spec,
                trust_spec,
                dry_run,
                cdi_spec_dirs,
                trust,
            };
            restore::restore(&store, out, &cli.address, ns, &args)
        }
        Command::Doctor { containerd_config, checkpoint } => {
            let config = store::load_config(cli.config.as_deref())?.checkpoint;
            // Resolved first: an unknown checkpoint is bad input (exit 2), not a failed check.
            let checkpoint = match checkpoint {
                Some(reference) => Some(store::resolve(&store, &reference)?),
                None => None,
            };
            let judged = checkpoint.map(|cp| {
                let verdict = commands::verdict_of(&cp, &config.cdi_spec_dirs).map(|(v, _)| v);
                (cp.id, verdict)
            });
            doctor::doctor(out, &cli.address, &containerd_config, store.root(), &config.libcuda, judged)
        }
        Command::Metrics { listen } => metrics::metrics(&store, out, listen),
        Command::Push { checkpoint, reference, plain_http } => {
            let config = store::load_config(cli.config.as_deref())?;
            registry::push(&store, &config, out, &checkpoint, &reference, plain_http)
        }
        Command::Pull { reference, plain_http } => {
            let config = store::load_config(cli.config.as_deref())?;
            registry::pull(&store, &config, out, &reference, plain_http, ns)
        }
        Command::Completions { .. }
        | Command::CudaCheckpoint(_)
        | Command::ContainerdConfig(_)
        | Command::Keygen { .. } => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
