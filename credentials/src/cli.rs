//! The command-line frame of the project's small binaries (`ftdisk`,
//! `ftcert`): the flags parsed with clap, the work run, and the project's
//! exit statuses — 0 on success and for `--help` and `--version`; 2 for a
//! usage error (clap's message) or a failure (one `NAME: error: ...` line on
//! stderr).

use std::process::ExitCode;

/// Parses the command line into `C` and runs `run` with it, ending as
/// described in the module's documentation; `name` starts the error line.
pub fn main<C: clap::Parser>(name: &str, run: impl FnOnce(&C) -> Result<(), String>) -> ExitCode {
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::from(2)
        }
    }
}
