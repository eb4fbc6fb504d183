//! Cost of one runtime decision for a typical Kubernetes `config.json` (~10 KiB):
//! the shim pays it on every container create. Run: `cargo bench -p kybernate-runtime-select`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use kybernate_runtime_select::{load_spec, Config, Context, Selector};

fn selector(path_dir: &Path) -> Selector {
    for name in ["runc", "nvidia-container-runtime"] {
        let p = path_dir.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    Selector {
        config: Config::default(),
        config_path: "/etc/kybernate/config.toml".into(),
        context: Context { search_path: Some(path_dir.as_os_str().to_owned()), ..Context::default() },
    }
}

fn bench(c: &mut Criterion) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let rt = tempfile::tempdir().unwrap();
    let sel = selector(rt.path());
    let mut g = c.benchmark_group("decide");
    for kind in ["cpu", "gpu"] {
        let bundle = tempfile::tempdir().unwrap();
        fs::copy(fixtures.join(format!("k8s-{kind}-config.json")), bundle.path().join("config.json")).unwrap();
        // Baseline: reading and parsing config.json, which the shim does anyway.
        g.bench_function(format!("read+parse/{kind}"), |b| b.iter(|| load_spec(bundle.path()).unwrap()));
        g.bench_function(format!("read+parse+decide/{kind}"), |b| b.iter(|| sel.select_bundle(bundle.path()).unwrap()));
        let spec = load_spec(bundle.path()).unwrap();
        g.bench_function(format!("decide-parsed/{kind}"), |b| b.iter(|| sel.select(&spec).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
