//! Sends one `Task.Checkpoint` straight to a shim's ttrpc socket, with the options containerd
//! would forward (`ctr` sends none for runtime names other than runc's). Used by
//! `test/bench/checkpoint.sh` until the `kybernate` CLI does this through containerd.
//!
//! usage: checkpoint_rpc SHIM_ADDRESS CONTAINER_ID IMAGE_PATH [--exit] [--tcp]

use containerd_shim_protos::api::CheckpointTaskRequest;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::CheckpointOptions;
use containerd_shim_protos::ttrpc::context;
use containerd_shim_protos::{Client, TaskClient};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [address, id, image_path, flags @ ..] = args.as_slice() else {
        eprintln!("usage: checkpoint_rpc SHIM_ADDRESS CONTAINER_ID IMAGE_PATH [--exit] [--tcp]");
        std::process::exit(2);
    };
    let options = CheckpointOptions {
        exit: flags.iter().any(|f| f == "--exit"),
        open_tcp: flags.iter().any(|f| f == "--tcp"),
        image_path: image_path.clone(),
        ..Default::default()
    };
    let value = match options.write_to_bytes() {
        Ok(v) => v,
        Err(e) => fail(&format!("encode options: {e}")),
    };
    let any = Any { type_url: "containerd.runc.v1.CheckpointOptions".into(), value, ..Default::default() };
    let client = match Client::connect(address.trim()) {
        Ok(c) => TaskClient::new(c),
        Err(e) => fail(&format!("connect to {address}: {e}")),
    };
    let req = CheckpointTaskRequest { id: id.clone(), options: Some(any).into(), ..Default::default() };
    if let Err(e) = client.checkpoint(context::with_duration(std::time::Duration::from_secs(600)), &req) {
        fail(&format!("checkpoint {id}: {e}"));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("checkpoint_rpc: {msg}");
    std::process::exit(1);
}
