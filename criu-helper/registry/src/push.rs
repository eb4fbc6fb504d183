//! Pushing a checkpoint from the store as an OCI image: one pass over each file, layers the
//! registry already holds skipped (found through the previous manifest of the same tag, then
//! confirmed with `HEAD`).

use std::collections::HashMap;
use std::path::Path;

use kybernate_checkpoint::verify_quick;
use oci_spec::image::{Descriptor, Digest, ImageManifest, ImageManifestBuilder, MediaType};

use crate::client::{sha256_digest, Client, Settings};
use crate::error::{io_ctx, RegistryError};
use crate::format::{self, LayerPlan, LayerReader, ANNOTATION_LAYER_CONTENT, ANNOTATION_TITLE};
use crate::reference::Reference;

/// What a push did (the CLI's JSON: `ref`, `digest`, `bytes_total`, `bytes_uploaded`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    #[serde(rename = "ref")]
    pub reference: String,
    /// The manifest's digest: `<repo>@<digest>` names exactly this checkpoint.
    pub digest: String,
    /// Every blob of the image (layers and config).
    pub bytes_total: u64,
    /// What was sent: less than the total when the registry already held some layers.
    pub bytes_uploaded: u64,
}

/// Where a push is, for a progress line: `done` of `total` bytes considered (uploaded or skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub done: u64,
    pub total: u64,
}

/// Pushes the checkpoint in `dir` (checked: its manifest and every listed file with its size)
/// to `reference` (a tag; a digest cannot be pushed to).
pub fn push(
    dir: &Path,
    reference: &Reference,
    settings: &Settings,
    progress: &mut dyn FnMut(Transfer),
) -> Result<Pushed, RegistryError> {
    let manifest = verify_quick(dir).map_err(|source| RegistryError::Verify { path: dir.to_path_buf(), source })?;
    let Some(tag) = reference.tag.clone().filter(|_| reference.digest.is_none()) else {
        return Err(RegistryError::Reference(crate::reference::ReferenceError {
            reference: reference.to_string(),
            reason: "a push needs a tag (repo:tag), not a digest",
        }));
    };
    let layers = format::plan(dir, &manifest).map_err(io_ctx(format!("{}: cannot plan the image", dir.display())))?;
    let client = Client::connect(reference, settings, true)?;
    let known = previous_layers(&client, &tag);

    let total: u64 = layers.iter().map(LayerPlan::len).sum();
    let mut done = 0u64;
    let mut uploaded = 0u64;
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in &layers {
        let len = layer.len();
        let reuse = layer.content.as_ref().and_then(|c| known.get(c)).cloned();
        let digest = match reuse {
            Some(d) if client.blob_exists(&d, len)? => d,
            _ => {
                let base = done;
                let mut report = |n: u64| {
                    done += n;
                    progress(Transfer { done, total });
                };
                let d = upload_layer(&client, dir, layer, &mut report)?;
                uploaded += done - base;
                done = base;
                d
            }
        };
        done += len;
        progress(Transfer { done, total });
        let mut annotations = HashMap::new();
        if let Some(content) = &layer.content {
            annotations.insert(ANNOTATION_LAYER_CONTENT.to_string(), content.clone());
            annotations.insert(ANNOTATION_TITLE.to_string(), layer.files[0].0.clone());
        }
        let mut d = Descriptor::new(MediaType::ImageLayer, len, parse_digest(&client, &digest)?);
        if !annotations.is_empty() {
            d.set_annotations(Some(annotations));
        }
        descriptors.push(d);
        diff_ids.push(digest);
    }

    let annotations = format::annotations(&manifest);
    let config = serde_json::json!({
        "architecture": format::oci_arch(),
        "os": "linux",
        "config": { "Labels": annotations },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = serde_json::to_vec(&config).expect("a JSON value serialises");
    let config_digest = sha256_digest(&config);
    if !client.blob_exists(&config_digest, config.len() as u64)? {
        client.upload_blob(&mut &config[..], config.len() as u64, &config_digest)?;
        uploaded += config.len() as u64;
    }
    let config_descriptor =
        Descriptor::new(MediaType::ImageConfig, config.len() as u64, parse_digest(&client, &config_digest)?);

    let image = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_descriptor)
        .layers(descriptors)
        .annotations(annotations.into_iter().collect::<HashMap<_, _>>())
        .build()
        .expect("every required field is set");
    // Through a JSON value: its maps are sorted, so the same checkpoint gives the same manifest
    // (oci-spec's annotations are a HashMap, serialised in random order).
    let value = serde_json::to_value(&image).expect("a manifest serialises");
    let bytes = serde_json::to_vec(&value).expect("a manifest serialises");
    let digest = client.put_manifest(&tag, &bytes)?;
    Ok(Pushed {
        reference: reference.to_string(),
        digest,
        bytes_total: total + config.len() as u64,
        bytes_uploaded: uploaded,
    })
}

/// Uploads one layer: the small-files layer is hashed first and skipped when present (it is
/// small); a large file's layer is streamed once, hashed on the way.
fn upload_layer(
    client: &Client,
    dir: &Path,
    layer: &LayerPlan,
    report: &mut dyn FnMut(u64),
) -> Result<String, RegistryError> {
    let len = layer.len();
    let open_err = |e| io_ctx(format!("{}: cannot read the checkpoint", dir.display()))(e);
    if layer.content.is_none() {
        let mut noop = |_| {};
        let mut hashing = LayerReader::new(dir, layer, &mut noop).map_err(open_err)?;
        std::io::copy(&mut hashing, &mut std::io::sink()).map_err(open_err)?;
        let digest = hashing.digest();
        if client.blob_exists(&digest, len)? {
            return Ok(digest);
        }
        let mut reader = LayerReader::new(dir, layer, report).map_err(open_err)?;
        client.upload_blob(&mut reader, len, &digest)?;
        if reader.digest() != digest {
            return Err(RegistryError::Io {
                context: format!("{}: the checkpoint changed while it was pushed", dir.display()),
                source: std::io::Error::other("a file's bytes differ between two reads"),
            });
        }
        return Ok(digest);
    }
    let mut reader = LayerReader::new(dir, layer, report).map_err(open_err)?;
    client.upload_streamed(&mut reader, len, |r| r.digest())
}

/// The large-file layers of the manifest the tag names now, by their content annotation (a
/// hint only: each is confirmed with `HEAD`; any failure just means no hints).
fn previous_layers(client: &Client, tag: &str) -> HashMap<String, String> {
    let Ok(Some((bytes, _))) = client.get_manifest(tag) else { return HashMap::new() };
    let Ok(image) = serde_json::from_slice::<ImageManifest>(&bytes) else { return HashMap::new() };
    image
        .layers()
        .iter()
        .filter_map(|l| {
            let content = l.annotations().as_ref()?.get(ANNOTATION_LAYER_CONTENT)?.clone();
            Some((content, l.digest().to_string()))
        })
        .collect()
}

fn parse_digest(client: &Client, digest: &str) -> Result<Digest, RegistryError> {
    digest
        .parse::<Digest>()
        .map_err(|e| RegistryError::BadImage { target: client.target(), reason: format!("digest {digest:?}: {e}") })
}
