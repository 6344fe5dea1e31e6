//! Generated gRPC code, and the descriptor sets that server reflection serves.
//!
//! The code in `gen/` is generated from `proto/` by
//! `cargo run --manifest-path tools/protogen/Cargo.toml` and committed, so a
//! build compiles no proto compiler; `tests::generated_code_is_current`
//! fails when a proto changes without a regeneration.

/// The seed's Contact service and messages (`proto/contact.proto`, no package).
///
/// The seed's method names are camelCase, so the generated stream types are too.
#[allow(non_camel_case_types)]
pub mod contact {
    include!("gen/contact.rs");
}

pub mod codec;
pub mod wire;

/// contactd's operator API (`proto/contactd/admin/v1/admin.proto`).
pub mod admin {
    include!("gen/admin.rs");
}

/// The Contact proto, encoded, for reflection on the public port.
pub const CONTACT_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/contact_descriptor.bin");

/// The admin proto, encoded, for reflection on the admin socket.
pub const ADMIN_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/admin_descriptor.bin");

/// The metadata header an agent sends on every call, carrying its name. A
/// caller without it (a seed client) is known by its peer address.
pub const AGENT_HEADER: &str = "x-contactd-agent";

/// The metadata header an agent sends on `getTask` with how many tasks it
/// runs at once (its `handler_concurrency`): in queue mode the server
/// assigns it no more than that, so a claim's `ack_timeout` measures
/// handling, not waiting in the agent. Metadata, not a proto field: the
/// seed's `getTask (Empty)` is fixed, and a caller without it (a seed
/// client, an older agent) is assigned up to `tasks.window`, as before.
pub const CONCURRENCY_HEADER: &str = "x-contactd-concurrency";

/// The largest [`CONCURRENCY_HEADER`] taken at its word (the agent's own
/// `handler_concurrency` range); more counts as this.
pub const MAX_CONCURRENCY: usize = 1024;

/// The concurrency an agent announced in `metadata`, if any: a number from
/// 1 up (at most [`MAX_CONCURRENCY`]); anything else counts as not said.
#[must_use]
pub fn announced_concurrency(metadata: &tonic::metadata::MetadataMap) -> Option<usize> {
    let text = metadata.get(CONCURRENCY_HEADER)?.to_str().ok()?;
    let n: usize = text.trim().parse().ok()?;
    (n >= 1).then_some(n.min(MAX_CONCURRENCY))
}

/// gRPC's retry hint, on a status: come back after this many
/// milliseconds. The server sets it when it ends streams to shut down (0:
/// at once, to its successor) and when it is too busy to take a new
/// connection now; the agent waits that long (with jitter) instead of its
/// failure backoff.
pub const RETRY_HINT: &str = "grpc-retry-pushback-ms";

/// The retry hint on `status`, if it has one.
#[must_use]
pub fn retry_hint(status: &tonic::Status) -> Option<std::time::Duration> {
    let ms: u64 = status
        .metadata()
        .get(RETRY_HINT)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// `status` with the retry hint `after`.
#[must_use]
pub fn with_retry_hint(mut status: tonic::Status, after: std::time::Duration) -> tonic::Status {
    let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    status
        .metadata_mut()
        .insert(RETRY_HINT, ms.to_string().parse().expect("digits"));
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_concurrency_is_a_positive_number_or_not_said() {
        let with = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert(CONCURRENCY_HEADER, value.parse().unwrap());
            announced_concurrency(&metadata)
        };
        assert_eq!(with("4"), Some(4));
        assert_eq!(with("100000"), Some(MAX_CONCURRENCY));
        assert_eq!(with("0"), None);
        assert_eq!(with("-1"), None);
        assert_eq!(with("four"), None);
        assert_eq!(
            announced_concurrency(&tonic::metadata::MetadataMap::new()),
            None
        );
    }

    use std::path::Path;

    /// Every proto's digest as `tools/protogen` recorded it when it wrote
    /// `gen/`: a proto edited since then needs a regeneration.
    #[test]
    fn generated_code_is_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let recorded = std::fs::read_to_string(root.join("src/proto/gen/SOURCES.sha256")).unwrap();
        let mut protos = 0;
        for line in recorded.lines() {
            let (digest, file) = line.split_once("  ").unwrap();
            let sha = ring::digest::digest(
                &ring::digest::SHA256,
                &std::fs::read(root.join(file)).unwrap(),
            );
            let now: String = sha.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                now, digest,
                "{file} changed since src/proto/gen/ was generated: run `cargo run --manifest-path tools/protogen/Cargo.toml`"
            );
            protos += 1;
        }
        assert_eq!(protos, 2, "{recorded}");
    }
}
