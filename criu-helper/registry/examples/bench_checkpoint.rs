//! Writes a checkpoint of MIB MiB of incompressible "memory pages" into a store, for
//! test/bench/registry.sh (no CRIU needed: the registry path only moves files).
//! Usage: bench_checkpoint STORE_ROOT MIB [PAGES_FILE]; prints the checkpoint's id. With
//! PAGES_FILE, that file's bytes are the pages (so `ctr` can push the very same bytes).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::SystemTime;

use kybernate_checkpoint::manifest::FORMAT_VERSION;
use kybernate_checkpoint::{CheckpointFlags, Manifest, PartialCheckpoint, Store, ToolInfo};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (root, mib) = (&args[1], args[2].parse::<u64>().expect("MIB"));
    let store = Store::new(root);
    let now = SystemTime::now();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        namespace: "bench".into(),
        container_id: "pages".into(),
        pod_namespace: None,
        pod_name: None,
        container_name: None,
        image: None,
        runtime: ToolInfo { path: "/usr/sbin/runc".into(), version: "bench".into() },
        criu: ToolInfo { path: "/usr/sbin/criu".into(), version: "bench".into() },
        kernel: "bench".into(),
        host: "bench".into(),
        created: humantime::format_rfc3339_millis(now).to_string(),
        options: CheckpointFlags::default(),
        rootfs_diff: false,
        duration_ms: 0,
        frozen_ms: None,
        dump_stats: None,
        digest: None,
        files: BTreeMap::new(),
        gpu: None,
        flat: false,
        needs: None,
    };
    let target = store.new_checkpoint_path("bench", "pages", now).expect("target");
    let p = PartialCheckpoint::begin(&target).expect("partial checkpoint");
    std::fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    let pages = p.images_dir().join("pages-1.img");
    match args.get(3) {
        Some(src) => {
            std::fs::copy(src, &pages).expect("copying the pages file");
        }
        None => {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&pages).unwrap());
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut block = vec![0u8; 1 << 20];
            for _ in 0..mib {
                for chunk in block.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all(&block).unwrap();
            }
            f.flush().unwrap();
        }
    }
    std::fs::write(p.dir().join(kybernate_checkpoint::SPEC_DUMP), b"{\"ociVersion\": \"1.0.2\"}").unwrap();
    p.commit(manifest).expect("commit");
    println!("{}", target.strip_prefix(store.root()).unwrap().display());
}
