//! ftclient: a client of a guest's serial console over TCP that survives a
//! failover. It reads lines from the first address; when that connection
//! ends it moves on to the next address (the backup's console), and it
//! checks the `tick N H` lines of the `ticker` guest for continuity: every
//! tick, in order, duplicates allowed only at the switch.
//!
//! `ftclient [--until-tick N] [--seconds S] ADDR [ADDR...]`

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn connect(addr: &str, deadline: Instant) -> Option<TcpStream> {
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                eprintln!("ftclient: cannot connect to {addr}: {e}");
                return None;
            }
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let mut until_tick = u64::MAX;
    let mut seconds = 30u64;
    let mut addrs = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--until-tick" => until_tick = args.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or(30),
            _ => addrs.push(a),
        }
    }
    if addrs.is_empty() {
        eprintln!("usage: ftclient [--until-tick N] [--seconds S] ADDR [ADDR...]");
        std::process::exit(2);
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut last, mut duplicates, mut missing, mut switches) = (0u64, 0u64, 0u64, 0u32);
    'outer: for (i, addr) in addrs.iter().enumerate() {
        let Some(stream) = connect(addr, Instant::now() + Duration::from_secs(10)) else { continue };
        if i > 0 {
            switches += 1;
            println!("ftclient: --- connection lost; now reading {addr} ---");
        } else {
            println!("ftclient: reading {addr}");
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            println!("  {line}");
            if let Some(n) =
                line.strip_prefix("tick ").and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok())
            {
                if last != 0 && n <= last {
                    duplicates += 1;
                } else if last != 0 && n > last + 1 {
                    missing += n - last - 1;
                }
                last = last.max(n);
                if n >= until_tick || Instant::now() >= end {
                    break 'outer;
                }
            }
        }
    }
    println!(
        "ftclient: last tick {last}; {missing} missing, {duplicates} repeated at {switches} failover(s): {}",
        if missing == 0 { "continuity OK" } else { "TICKS LOST" }
    );
    std::process::exit(if missing == 0 && last > 0 { 0 } else { 1 });
}
