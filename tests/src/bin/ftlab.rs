//! `ftlab`: makes and removes network-namespace "hosts" on one LAN for the
//! demo and for manual experiments (the tests use the same code as a
//! library: `ftvmm_tests::lab`).
//!
//! ```text
//! ftlab up LAB SUBNET HOST=OCTET... [--owner PID]   e.g. ftlab up ftdemo 10.77.0 primary=1 backup=2
//! ftlab tap LAB HOST TAP                            a TAP on HOST, bridged onto the LAN
//! ftlab cut LAB HOST | ftlab restore LAB HOST       take HOST's link down / up
//! ftlab down LAB                                    remove the lab (and kill what runs in it)
//! ftlab sweep                                       remove the labs whose owner died
//! ```
//!
//! Host HOST of lab LAB is the namespace `LAB-HOST` (`ip netns exec LAB-HOST ...`).

use clap::{Parser, Subcommand};
use ftvmm_tests::lab::{self, Lab};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ftlab", about = "Network-namespace hosts on one LAN, for ftvmm's demo and tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create lab LAB (removing what an earlier one of that name left) on the
    /// /24 SUBNET (e.g. 10.77.0), with hosts NAME=OCTET.
    Up {
        lab: String,
        subnet: String,
        #[arg(required = true)]
        hosts: Vec<String>,
        /// The process whose death orphans the lab (default: ftlab's parent).
        #[arg(long)]
        owner: Option<u32>,
    },
    /// Give HOST a TAP device named TAP, bridged onto the LAN.
    Tap { lab: String, host: String, tap: String },
    /// Cut HOST's link to the LAN.
    Cut { lab: String, host: String },
    /// Bring HOST's link back.
    Restore { lab: String, host: String },
    /// Remove lab LAB.
    Down { lab: String },
    /// Remove every lab whose owner died.
    Sweep,
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::Up { lab: name, subnet, hosts, owner } => {
            let mut parsed = Vec::new();
            for h in &hosts {
                let (host, octet) = h.split_once('=').ok_or_else(|| format!("{h:?}: want HOST=OCTET"))?;
                let octet: u8 = octet.parse().map_err(|_| format!("{h:?}: the octet must be 1-253"))?;
                if !(1..=253).contains(&octet) {
                    return Err(format!("{h:?}: the octet must be 1-253"));
                }
                parsed.push((host, octet));
            }
            let owner = owner.unwrap_or_else(std::os::unix::process::parent_id);
            let lab = Lab::create(&name, &subnet, &parsed, owner).map_err(|e| e.to_string())?;
            for h in &lab.hosts {
                println!("{} {} {}", h.name, h.ns, h.ip);
            }
            lab.keep();
            Ok(())
        }
        Cmd::Tap { lab, host, tap } => Lab::open(&lab).and_then(|l| l.add_tap(&host, &tap)).map_err(|e| e.to_string()),
        Cmd::Cut { lab, host } => Lab::open(&lab).and_then(|l| l.cut(&host)).map_err(|e| e.to_string()),
        Cmd::Restore { lab, host } => Lab::open(&lab).and_then(|l| l.restore(&host)).map_err(|e| e.to_string()),
        Cmd::Down { lab } => {
            lab::destroy(&lab);
            Ok(())
        }
        Cmd::Sweep => {
            lab::sweep_orphans();
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftlab: error: {e}");
            ExitCode::from(2)
        }
    }
}
