//! Request sessions: at most once, never an old request after a newer one,
//! through connections that break mid-request.

use super::*;
use crate::session::{Disposition, Sessions, MAX_SESSIONS, REPLY_CACHE};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::mpsc;

fn write_op(tag: u8) -> Op {
    Op::Write { offset: 0, data: vec![tag; 512], generation: 0 }
}

#[test]
fn a_slot_executes_each_request_once_and_never_an_old_one() {
    let sessions = Sessions::new();
    let slot = sessions.slot(7).unwrap();
    let executed = std::cell::Cell::new(0);
    let run = |seq: u64, op: Op| {
        slot.handle(seq, op, |op| {
            executed.set(executed.get() + 1);
            Ok(match op {
                Op::Read { len, .. } => Reply::Data(vec![0; len as usize]),
                _ => Reply::Done,
            })
        })
    };
    assert_eq!(run(1, write_op(1)), (Ok(Reply::Done), Disposition::Executed));
    // The retry is answered, not executed.
    assert_eq!(run(1, write_op(1)), (Ok(Reply::Done), Disposition::Remembered));
    assert_eq!(executed.get(), 1);
    // Numbers may skip (a call the client gave up on).
    assert_eq!(run(5, write_op(5)), (Ok(Reply::Done), Disposition::Executed));
    // Older than the applied mark and never seen: not executed.
    assert_eq!(run(3, write_op(3)), (Err(DiskError::Stale { seq: 3, applied: 5 }), Disposition::Refused));
    // A number reused for another kind of request is refused.
    let (result, disposition) = run(5, Op::Flush { generation: 0 });
    assert!(matches!(result, Err(DiskError::Invalid(_))), "{result:?}");
    assert_eq!(disposition, Disposition::Refused);
    assert_eq!(executed.get(), 2);

    // Reads keep no data: the latest is read again, an older one is stale.
    let read = Op::Read { offset: 0, len: 512 };
    assert_eq!(run(6, read.clone()).1, Disposition::Executed);
    assert_eq!(run(6, read.clone()), (Ok(Reply::Data(vec![0; 512])), Disposition::ReadAgain));
    assert_eq!(run(7, write_op(7)).1, Disposition::Executed);
    assert_eq!(run(6, read).1, Disposition::Refused);
    assert_eq!(executed.get(), 5);

    // Only the last REPLY_CACHE outcomes are remembered.
    for seq in 8..8 + REPLY_CACHE as u64 {
        assert_eq!(run(seq, write_op(seq as u8)).1, Disposition::Executed);
    }
    assert_eq!(run(8, write_op(8)).1, Disposition::Remembered);
    assert_eq!(run(7, write_op(7)), (Err(DiskError::Stale { seq: 7, applied: 15 }), Disposition::Refused));
    // Sequence number 0 is below every applied mark: never executed.
    let fresh = sessions.slot(8).unwrap();
    assert_eq!(fresh.handle(0, Op::Info, |_| unreachable!()).1, Disposition::Refused);
}

#[test]
fn the_session_table_is_bounded_and_keeps_sessions_in_use() {
    let sessions = Sessions::new();
    // Sessions 0 and 1 are in use (a connection holds them), the others not.
    let held: Vec<_> = (0..2).map(|id| sessions.slot(id).unwrap()).collect();
    for id in 2..MAX_SESSIONS as u64 {
        drop(sessions.slot(id).unwrap());
    }
    // Session 2 is used again: session 3 is now the least recently used.
    drop(sessions.slot(2).unwrap());
    assert_eq!(sessions.counts(), (MAX_SESSIONS, 0));
    drop(sessions.slot(10_000).unwrap());
    assert_eq!(sessions.counts(), (MAX_SESSIONS, 1));
    // Session 3 was forgotten: it starts afresh; the others were kept.
    let three = sessions.slot(3).unwrap();
    assert_eq!(three.handle(1, Op::Info, |_| Ok(Reply::Done)).1, Disposition::Executed);
    assert_eq!(sessions.counts(), (MAX_SESSIONS, 2));
    for id in [0, 1, 2] {
        assert_eq!(sessions.slot(id).unwrap().handle(1, Op::Info, |_| Ok(Reply::Done)).1, Disposition::Executed);
    }
    let held_too = held.iter().all(|slot| std::sync::Arc::strong_count(slot) == 2);
    assert!(held_too);

    // When every session is in use, a new one is refused, not admitted.
    let full = Sessions::new();
    let all: Vec<_> = (0..MAX_SESSIONS as u64).map(|id| full.slot(id).unwrap()).collect();
    assert!(matches!(full.slot(u64::MAX), Err(DiskError::Busy(_))));
    drop(all);
    assert!(full.slot(u64::MAX).is_ok());
}

#[test]
fn a_retried_request_is_answered_from_memory() {
    let dir = TempDir::new("retry-raw");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let addr = server.local_addr();
    let session = 0xabcd;
    let mut first = raw_connect(addr);
    assert_eq!(send_in(&mut first, session, 1, write_op(1)).result, Ok(Reply::Done));
    assert_eq!(send_in(&mut first, session, 2, write_op(2)).result, Ok(Reply::Done));
    // The same requests again, on another connection: answered, not run.
    let mut second = raw_connect(addr);
    assert_eq!(send_in(&mut second, session, 1, write_op(1)).result, Ok(Reply::Done));
    assert_eq!(send_in(&mut second, session, 2, write_op(2)).result, Ok(Reply::Done));
    let stats = server.stats();
    assert_eq!((stats.writes_applied, stats.answered_from_memory), (2, 2), "{stats:?}");
    // A request older than the newest executed one, never seen before (it
    // was still in the network, say), does not execute.
    assert_eq!(send_in(&mut second, session, 4, write_op(4)).result, Ok(Reply::Done));
    assert_eq!(send_in(&mut first, session, 3, write_op(3)).result, Err(DiskError::Stale { seq: 3, applied: 4 }));
    assert_eq!(server.stats().writes_applied, 3);
    assert_eq!(client(&server).read(0, 512).unwrap(), vec![4; 512]);
    assert_eq!(send_in(&mut first, session, 5, write_op(2)).result, Ok(Reply::Done));
    // Another session is another numbering.
    assert_eq!(
        send_in(&mut second, session + 1, 1, Op::Read { offset: 0, len: 512 }).result,
        Ok(Reply::Data(vec![2; 512]))
    );
    assert_eq!(client(&server).read(0, 512).unwrap(), vec![2; 512]);
    assert_eq!(server.stats().connection_panics, 0);
}

/// The race of the issue, deterministically: a write waits in the server
/// behind a (slow) test-and-set on a connection the client lost; the
/// client gives up on it and writes the same sector again. The old write
/// must not land after the new one.
#[test]
fn a_write_queued_behind_a_test_and_set_never_lands_after_a_newer_one() {
    let dir = TempDir::new("queued");
    let image = dir.image(64 << 10);
    let server = start(&image);
    // Request 1 is Info; request 2, the first write, is forwarded and then
    // its connection reset; every later attempt goes through.
    let mut n = 0;
    let proxy = Proxy::start(server.local_addr(), move |_| {
        n += 1;
        if n == 2 {
            Fate::ResetAfterForward
        } else {
            Fate::Pass
        }
    });
    let mut c = DiskClient::connect(&proxy.addr().to_string(), TIMEOUT).unwrap();
    thread::scope(|scope| {
        let stall = server.stall();
        c.set_retry_for(Duration::from_millis(300));
        // Waits behind the stall on the old connection and on the new one,
        // until the client gives up.
        let err = c.write(0, &[0xaa; 512], 0).unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        c.set_retry_for(TIMEOUT);
        let newer = scope.spawn(|| c.write(0, &[0xbb; 512], 0));
        thread::sleep(Duration::from_millis(100));
        drop(stall);
        newer.join().unwrap().unwrap();
    });
    proxy.settle();
    assert_eq!(client(&server).read(0, 512).unwrap(), vec![0xbb; 512]);
    let stats = server.stats();
    // The old write ran once (on the first connection, or its retry did),
    // before the newer one; never twice.
    assert_eq!(stats.writes_applied, 2, "{stats:?}");
    assert!(stats.answered_from_memory >= 1, "{stats:?}");
}

/// Many writes to the same sectors through a proxy that breaks
/// connections mid-request in every way, while the server stalls now and
/// then (as behind a slow test-and-set): each write is applied exactly
/// once, and each sector ends with its last acknowledged write.
#[test]
fn retried_writes_through_a_breaking_network_apply_once_in_order() {
    for seed in [1u64, 2, 3] {
        let dir = TempDir::new("chaos");
        let image = dir.image(64 << 10);
        let server = start(&image);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fates = StdRng::seed_from_u64(seed ^ 0xf00d);
        let proxy = Proxy::start(server.local_addr(), move |request| {
            if !matches!(request.op, Op::Write { .. }) {
                return Fate::Pass;
            }
            // A failure on 30% of the attempts.
            match fates.gen_range(0..20) {
                0..=13 => Fate::Pass,
                14..=15 => Fate::ResetAfterForward,
                16..=17 => Fate::LoseAnswer,
                _ => Fate::Delay(Duration::from_millis(fates.gen_range(0..20))),
            }
        });
        let mut c = DiskClient::connect(&proxy.addr().to_string(), TIMEOUT).unwrap();
        const WRITES: usize = 300;
        let mut last = [None, None];
        let done = AtomicBool::new(false);
        thread::scope(|scope| {
            let staller = scope.spawn(|| {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x57a11);
                while !done.load(Ordering::SeqCst) {
                    let stall = server.stall();
                    thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
                    drop(stall);
                    thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
                }
            });
            for i in 0..WRITES {
                // Mostly the same sector, so that an old write landing late
                // would show.
                let sector = usize::from(rng.gen_range(0..4) == 0);
                c.write(sector as u64 * 512, &block(i), 0).unwrap();
                last[sector] = Some(i);
            }
            done.store(true, Ordering::SeqCst);
            staller.join().unwrap();
        });
        proxy.settle();
        let mut direct = client(&server);
        for (sector, i) in last.iter().enumerate() {
            let want = i.map_or(vec![0; 512], block);
            assert_eq!(direct.read(sector as u64 * 512, 512).unwrap(), want, "seed {seed}, sector {sector}");
        }
        let stats = server.stats();
        eprintln!("seed {seed}: {stats:?}");
        assert_eq!(stats.writes_applied, WRITES as u64, "seed {seed}: {stats:?}");
        // The test did exercise both ways of not executing a request again.
        assert!(stats.answered_from_memory > 0, "seed {seed}: {stats:?}");
        assert_eq!(stats.connection_panics, 0);
    }
}

/// A server that forgot the session (it restarted) executes a retried
/// test-and-set again, which then loses against our own first win: the
/// client reports the win, once.
#[test]
fn a_test_and_set_retried_across_a_server_restart_still_wins_once() {
    let dir = TempDir::new("tas-restart");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let addr = server.local_addr();
    let (ready, wait_ready) = mpsc::channel();
    let (go, wait_go) = mpsc::channel::<()>();
    let mut n = 0;
    let proxy = Proxy::start(addr, move |request| {
        if !matches!(request.op, Op::TestAndSet { .. }) {
            return Fate::Pass;
        }
        n += 1;
        match n {
            1 => Fate::LoseAnswer,
            2 => {
                // The retry waits until the server has restarted; it then
                // goes to the old (closed) server connection and fails.
                ready.send(()).unwrap();
                wait_go.recv().unwrap();
                Fate::Pass
            }
            _ => Fate::Pass,
        }
    });
    let mut c = DiskClient::connect(&proxy.addr().to_string(), TIMEOUT).unwrap();
    let tas = thread::spawn(move || {
        let outcome = c.test_and_set(0, "backup@b");
        (c, outcome)
    });
    wait_ready.recv_timeout(TIMEOUT).unwrap();
    server.stop();
    let server = restart(&image, addr);
    go.send(()).unwrap();
    let (mut c, outcome) = tas.join().unwrap();
    assert_eq!(outcome.unwrap(), TasOutcome::Won { generation: 1 });
    assert_eq!(c.owner().unwrap(), (1, "backup@b".to_string()));
    c.write(0, &block(1), 1).unwrap();
    assert_eq!(server.stats().writes_applied, 1);
}
