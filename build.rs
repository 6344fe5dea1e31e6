//! Compiles the protos with the pure-Rust `protox` compiler, so building
//! contactd needs no system `protoc`.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["contact.proto", "contactd/admin/v1/admin.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    // Server reflection needs the descriptor set; prost-build only writes it
    // itself when it runs protoc, so write it here.
    // One set per listener: the public port describes only what it serves.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for (name, proto) in [
        ("contact", "contact.proto"),
        ("admin", "contactd/admin/v1/admin.proto"),
    ] {
        let mut only = fds.clone();
        only.file.retain(|f| f.name() == proto);
        fs::write(
            out_dir.join(format!("{name}_descriptor.bin")),
            only.encode_to_vec(),
        )?;
    }
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
