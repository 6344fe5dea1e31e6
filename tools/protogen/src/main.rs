//! Compiles contactd's protos with the pure-Rust `protox` compiler (no
//! system `protoc`) and writes, into `src/proto/gen/`:
//! - `contact.rs`, `admin.rs`: the prost messages and tonic client/server;
//! - `contact_descriptor.bin`, `admin_descriptor.bin`: one encoded file
//!   descriptor set per listener, for server reflection (the public port
//!   describes only what it serves);
//! - `SOURCES.sha256`: the digest of every proto it read, which contactd's
//!   tests compare with proto/ to catch a proto edited without regenerating.

use std::{error::Error, fmt::Write as _, fs, path::Path};

use prost::Message;
use sha2::{Digest, Sha256};

/// (file under proto/, name of the generated module, prost's output file)
const PROTOS: &[(&str, &str, &str)] = &[
    ("contact.proto", "contact", "_.rs"),
    ("contactd/admin/v1/admin.proto", "admin", "contactd.admin.v1.rs"),
];

fn main() -> Result<(), Box<dyn Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto_dir = root.join("proto");
    let out = root.join("src/proto/gen");
    let scratch = tempdir(&out)?;

    let files: Vec<&str> = PROTOS.iter().map(|(file, ..)| *file).collect();
    let fds = protox::compile(&files, [&proto_dir])?;
    tonic_prost_build::configure()
        // Prost's codec, with buffers the server makes smaller
        // (src/proto/codec.rs): a fan-out stream kept tonic's 32 KiB of
        // encode buffer for its life.
        .codec_path("crate::proto::codec::ContactCodec")
        .out_dir(&scratch)
        .compile_fds(fds.clone())?;

    let mut sums = String::new();
    for (file, module, generated) in PROTOS {
        let mut only = fds.clone();
        only.file.retain(|f| f.name() == *file);
        fs::write(
            out.join(format!("{module}_descriptor.bin")),
            only.encode_to_vec(),
        )?;
        fs::rename(scratch.join(generated), out.join(format!("{module}.rs")))?;
        let digest = Sha256::digest(fs::read(proto_dir.join(file))?);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(sums, "{hex}  proto/{file}")?;
    }
    fs::write(out.join("SOURCES.sha256"), sums)?;
    fs::remove_dir(&scratch)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// An empty directory next to the output for prost's files.
fn tempdir(out: &Path) -> std::io::Result<std::path::PathBuf> {
    fs::create_dir_all(out)?;
    let scratch = out.join(".protogen");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir(&scratch)?;
    Ok(scratch)
}
