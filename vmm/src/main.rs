//! The `ftvmm` binary: see `ftvmm --help`. Parses the command line into a
//! configuration, builds the VM from it and runs it.

use std::process::ExitCode;
use vmm::cli::Command;
use vmm::config::{Mode, VmConfig};
use vmm::error::Error;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let command = match vmm::cli::parse(std::env::args_os().collect()) {
        Ok(command) => command,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let config = match command {
        Ok(Command::Check(check)) => return ExitCode::from(vmm::check::run(&check)),
        Ok(Command::Status(status)) => return ExitCode::from(vmm::status::run(&status)),
        Ok(Command::ListGuests) => {
            for g in guest_images::GUESTS {
                println!("{:<10} {}", g.name, g.description);
            }
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(config)) => config,
        Err(e) => return fail(&e),
    };
    match run(&config) {
        Ok(status) => ExitCode::from(status),
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("ftvmm: error: {e}");
    ExitCode::from(e.exit_status())
}

/// Builds and runs the VM; returns the guest's exit status.
fn run(config: &VmConfig) -> Result<u8, Error> {
    if config.run_as.is_some() {
        // Before the VM's threads start, so that they all inherit it.
        vmm::privileges::forbid_new_privileges()?;
    }
    // Before any thread starts: each installs its kind's filter on itself.
    vmm::seccomp::prepare(config.seccomp, config.run_as.as_ref())?;
    let vmm = vmm::builder::build(config)?;
    if let Some(run_as) = &config.run_as {
        // Everything privileged is open: the rest runs as run_as.
        let later_links = matches!(config.mode, Mode::Primary { .. } | Mode::Backup { listen: Some(_), .. });
        if let Err(e) = vmm::privileges::allow_realtime_priority() {
            if later_links {
                eprintln!(
                    "ftvmm: warning: --run-as: cannot raise RLIMIT_RTPRIO ({e}): the logging channel of a backup \
                     that joins later runs at normal priority (see docs/sandbox.md)"
                );
            }
        }
        run_as.drop_privileges()?;
    }
    // Set up, unprivileged: from here on the vCPU thread makes only the
    // calls its list allows (docs/sandbox.md).
    vmm::seccomp::enter(vmm::seccomp::ThreadKind::Vcpu)?;
    let outcome = vmm.run()?;
    if config.stats {
        let kinds: Vec<String> =
            outcome.exits_by_kind.iter().filter(|(_, n)| *n > 0).map(|(kind, n)| format!("{kind} {n}")).collect();
        eprintln!("ftvmm: stats: {} guest exits (this VMM's, by kind: {})", outcome.exits, kinds.join(", "));
        let s = outcome.syncs;
        if s.count > 0 {
            eprintln!(
                "ftvmm: stats: {} syncs, {} page bytes, {} us in total, max {} us, {} with page-table changes",
                s.count, s.page_bytes, s.total_us, s.max_us, s.table_changes
            );
        }
        if let Some((n, p50, p99, max)) = outcome.commit_latency {
            eprintln!("ftvmm: stats: output-commit latency over {n} outputs: p50 {p50} us, p99 {p99} us, max {max} us");
        }
        for (hop, (n, p50, p99, max)) in &outcome.commit_hops {
            eprintln!(
                "ftvmm: stats: output-commit hop {hop} over {n} outputs: p50 {p50} us, p99 {p99} us, max {max} us"
            );
        }
        if let Some((n, p50, p99, max)) = outcome.ack_delay {
            eprintln!("ftvmm: stats: backup ack delay (batch read -> ack written) over {n} acks: p50 {p50} us, p99 {p99} us, max {max} us");
        }
        match outcome.disk_peaks {
            (0, 0) => {}
            (deferred, kept) => eprintln!(
                "ftvmm: stats: disk writes not yet applied peaked at {deferred} bytes; kept for going live: {kept} bytes"
            ),
        }
        if let (checks, Some(us)) = outcome.checks {
            eprintln!("ftvmm: stats: {checks} digest check(s), {us} us each on average");
        }
    }
    if config.digest {
        if let Some(d) = outcome.digest {
            eprintln!("state-digest: {d}");
        }
    }
    Ok(outcome.status)
}
