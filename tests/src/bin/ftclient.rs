//! ftclient: a client of a guest's serial console over TCP that survives a
//! failover. It reads lines from the first address; when that connection
//! ends it moves on to the next address (the backup's console), and it
//! checks the `tick N H` lines of the `ticker` guest for continuity: every
//! tick, in order, duplicates allowed only at the switch.
//!
//! With `--kv N` it is a client of the `kvstore` guest instead: it sends
//! `set kI vI` for I in 0..N, one at a time, 20 ms apart, failing over the
//! same way, then reads every key whose `OK` it received and checks that
//! each is there.
//!
//! With `--redis N` it is a client of the `redis` guest over the VM's own
//! network address: it holds ONE TCP connection for the whole run and sends
//! N rounds of `INCR counter` and `SET keyI valueI`, 20 ms apart, through
//! any failover (the connection must never break, the INCR values must be
//! consecutive); it prints the longest pause it saw, then reads back every
//! SET that was acknowledged.
//!
//! `ftclient [--until-tick N] [--seconds S] [--kv N | --redis N] ADDR [ADDR...]`

use ftvmm_tests::resp::{Reply, RespConn};
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

/// A kvstore session that moves to the next address when its connection dies.
struct KvSession<'a> {
    addrs: &'a [String],
    at: usize,
    conn: Option<BufReader<TcpStream>>,
}

impl KvSession<'_> {
    /// Sends `line` and returns its reply. When the connection dies, moves
    /// to the next address, skips what the new primary re-emits (answers the
    /// old one had not released), and asks again: every command here is
    /// idempotent. None when no address is left.
    fn ask(&mut self, line: &str) -> Option<String> {
        loop {
            if self.conn.is_none() {
                let addr = self.addrs.get(self.at)?;
                // An address that does not answer (its host is dead too): the next one.
                let Some(stream) = connect(addr, Instant::now() + Duration::from_secs(10)) else {
                    self.fail_over();
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                println!("ftclient: connected to {addr}");
                let mut conn = BufReader::new(stream);
                if self.at > 0 && Self::exchange(&mut conn, "get ftclient-probe", |r| r == "NOTFOUND").is_none() {
                    self.fail_over();
                    continue;
                }
                self.conn = Some(conn);
            }
            let conn = self.conn.as_mut()?;
            match Self::exchange(conn, line, |r| !r.starts_with("kvstore: ready")) {
                Some(reply) => return Some(reply),
                None => self.fail_over(),
            }
        }
    }

    fn fail_over(&mut self) {
        println!("ftclient: --- connection lost; failing over ---");
        self.conn = None;
        self.at += 1;
    }

    /// Sends `line`, then reads lines until one satisfies `answer`.
    fn exchange(conn: &mut BufReader<TcpStream>, line: &str, answer: impl Fn(&str) -> bool) -> Option<String> {
        use std::io::Write;
        conn.get_mut().write_all(format!("{line}\n").as_bytes()).ok()?;
        loop {
            let mut reply = String::new();
            match conn.read_line(&mut reply) {
                Ok(n) if n > 0 => {
                    let r = reply.trim_end();
                    if answer(r) {
                        return Some(r.to_string());
                    }
                }
                _ => return None,
            }
        }
    }
}

fn kv(addrs: &[String], n: u64) -> i32 {
    let mut session = KvSession { addrs, at: 0, conn: None };
    let mut acked = Vec::new();
    for i in 0..n {
        let q = format!("set k{i} v{i}");
        match session.ask(&q) {
            Some(r) if r == "OK" => {
                println!("  {q} -> OK");
                acked.push(i);
            }
            Some(r) => println!("  {q} -> {r}"),
            None => {
                println!("  {q} -> no server left");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut missing = 0;
    for i in &acked {
        match session.ask(&format!("get k{i}")) {
            Some(r) if r == format!("VALUE v{i}") => {}
            other => {
                println!("  get k{i} -> {other:?}: LOST");
                missing += 1;
            }
        }
    }
    println!(
        "ftclient: {} sets acknowledged, {} readable afterwards: {}",
        acked.len(),
        acked.len() - missing,
        if missing == 0 { "no acknowledged write lost" } else { "WRITES LOST" }
    );
    i32::from(missing > 0 || acked.is_empty())
}

fn redis(addr: &str, rounds: u64) -> i32 {
    let mut conn = match RespConn::connect(addr, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ftclient: cannot connect to {addr}: {e}");
            return 1;
        }
    };
    println!("ftclient: one connection to {addr} for the whole run");
    let (mut last, mut acked, mut longest, mut longest_at) = (None::<i64>, Vec::new(), Duration::ZERO, 0);
    for i in 0..rounds {
        let started = Instant::now();
        let n = match conn.cmd(&["INCR", "ftclient-counter"]) {
            Ok(Reply::Int(n)) => n,
            Ok(other) => {
                println!("ftclient: INCR answered {other:?}");
                return 1;
            }
            Err(e) => {
                println!("ftclient: the connection broke at round {i}: {e}");
                return 1;
            }
        };
        if last.is_some_and(|l| n != l + 1) {
            println!("ftclient: INCR went from {last:?} to {n}: NOT CONSECUTIVE");
            return 1;
        }
        last = Some(n);
        let (k, v) = (format!("key{i}"), format!("value{i}"));
        match conn.cmd(&["SET", &k, &v]) {
            Ok(Reply::Simple(s)) if s == "OK" => acked.push((k, v)),
            other => {
                println!("ftclient: SET {k} answered {other:?}");
                return 1;
            }
        }
        let took = started.elapsed();
        if took > longest {
            (longest, longest_at) = (took, i);
        }
        if took > Duration::from_millis(50) {
            println!("ftclient: round {i} (INCR -> {n}) took {} ms", took.as_millis());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lost = 0;
    for (k, v) in &acked {
        match conn.cmd(&["GET", k]) {
            Ok(Reply::Bulk(Some(got))) if got == v.as_bytes() => {}
            other => {
                println!("ftclient: GET {k} -> {other:?}: LOST");
                lost += 1;
            }
        }
    }
    println!(
        "ftclient: {rounds} rounds on one connection, INCR consecutive up to {}, longest pause {} ms (round {longest_at}); \
         {} SETs acknowledged, {} readable afterwards: {}",
        last.unwrap_or(0),
        longest.as_millis(),
        acked.len(),
        acked.len() - lost,
        if lost == 0 { "no acknowledged write lost" } else { "WRITES LOST" }
    );
    i32::from(lost > 0)
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let mut until_tick = u64::MAX;
    let mut seconds = 30u64;
    let mut kv_sets = None;
    let mut redis_rounds = None;
    let mut addrs = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--until-tick" => until_tick = args.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or(30),
            "--kv" => kv_sets = args.next().and_then(|v| v.parse().ok()),
            "--redis" => redis_rounds = args.next().and_then(|v| v.parse().ok()),
            _ => addrs.push(a),
        }
    }
    if addrs.is_empty() {
        eprintln!("usage: ftclient [--until-tick N] [--seconds S] [--kv N | --redis N] ADDR [ADDR...]");
        std::process::exit(2);
    }
    if let Some(n) = redis_rounds {
        std::process::exit(redis(&addrs[0], n));
    }
    if let Some(n) = kv_sets {
        std::process::exit(kv(&addrs, n));
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
