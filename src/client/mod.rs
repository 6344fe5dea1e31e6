//! The operator's clients of a running server: `cmd` (remoteCMD calls,
//! [`remote`]), `health` (the health probe, [`health`]), and the admin API's
//! commands (`task submit`, `agents`, `tasks`, `task show|cancel|retry`,
//! [`admin`]); and how every command writes its output.

pub mod admin;
pub mod health;
pub mod remote;

/// Writes a command's output to stdout through a handle. A reader that went
/// away (`contactd tasks | head`) ends the command quietly, as other CLIs
/// do, where `print!` would panic ("failed printing to stdout").
///
/// # Errors
/// Any write error but a broken pipe.
pub fn write_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
