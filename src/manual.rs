//! Shell completions and man pages, generated from the clap definitions in
//! [`crate::cli`] by the hidden commands `contactd completions SHELL` and
//! `contactd man DIR`. The package build runs them (packaging/build-deb.sh),
//! so what is installed always matches the binary it ships with, and
//! nothing generated is committed to drift from `--help`.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;

/// The completion script for `shell`.
#[must_use]
pub fn completions(shell: clap_complete::Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "contactd", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

/// Writes one man page per command into `dir` (created if needed):
/// `contactd.1`, then `contactd-SUBCOMMAND.1` for each visible subcommand,
/// nested ones too (`contactd-task-submit.1`), as git and cargo do.
/// Returns the files written.
///
/// The pages are dated with the build date (`SOURCE_DATE_EPOCH` when set),
/// not today: the same source gives the same pages.
///
/// # Errors
/// `dir` or a page cannot be written.
pub fn man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // No `help` subcommand pages: `man contactd-help` would only say to
    // read the other pages. (Disabled before `build`, which adds it.)
    let mut root = Cli::command().disable_help_subcommand(true);
    root.build();
    let mut written = Vec::new();
    write_pages(root, dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    command: clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    let page = clap_mangen::Man::new(command)
        .date(env!("CONTACTD_BUILD_DATE"))
        // clap_mangen's default names the subcommand (`submit 0.1.0`).
        .source(concat!("contactd ", env!("CARGO_PKG_VERSION")))
        .manual("contactd manual");
    let path = dir.join(page.get_filename());
    let mut roff = Vec::new();
    page.render(&mut roff)?;
    std::fs::write(&path, roff)?;
    written.push(path);
    Ok(())
}
