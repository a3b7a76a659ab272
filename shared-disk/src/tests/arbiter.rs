//! The arbiter-only server, and the [`Arbiter`] client on both kinds of
//! server.

use super::*;

fn start_arbiter(state: &Path) -> Server {
    logs();
    Server::start_arbiter(state, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
}

fn arbiter(server: &Server) -> Arbiter {
    Arbiter::connect(&server.local_addr().to_string(), TIMEOUT).unwrap()
}

#[test]
fn an_arbiter_only_server_arbitrates_and_survives_a_restart() {
    let dir = TempDir::new("arbiter");
    let state = dir.0.join("pair.state");
    let server = start_arbiter(&state);
    assert!(server.is_arbiter_only());
    assert_eq!(server.size(), 0);
    // Created at generation 0.
    assert_eq!(fs::read_to_string(&state).unwrap(), "ftdisk-owner 1\ngeneration 0\nowner \n");
    let addr = server.local_addr();
    let mut a = arbiter(&server);
    let mut b = arbiter(&server);
    assert_eq!(a.kind(), ServerKind::ArbiterOnly);
    assert_ne!(a.session(), b.session());
    assert_eq!(a.generation().unwrap(), 0);
    assert_eq!(a.test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 });
    assert_eq!(b.test_and_set(0, "backup@b").unwrap(), TasOutcome::Lost { generation: 1, owner: "primary@a".into() });
    assert_eq!(b.owner().unwrap(), (1, "primary@a".to_string()));
    assert_eq!(b.test_and_set(1, "backup@b").unwrap(), TasOutcome::Won { generation: 2 });
    assert!(matches!(a.test_and_set(0, "bad\nname"), Err(ClientError::Disk(DiskError::Invalid(_)))));

    server.stop();
    assert_eq!(fs::read_to_string(&state).unwrap(), "ftdisk-owner 1\ngeneration 2\nowner backup@b\n");
    let server = restart_arbiter(&state, addr);
    // The same clients carry on, with the record as it was.
    assert_eq!(a.owner().unwrap(), (2, "backup@b".to_string()));
    assert_eq!(a.test_and_set(1, "primary@a").unwrap(), TasOutcome::Lost { generation: 2, owner: "backup@b".into() });
    assert_eq!(a.test_and_set(2, "primary@a").unwrap(), TasOutcome::Won { generation: 3 });
    assert_eq!(server.stats().connection_panics, 0);
}

fn restart_arbiter(state: &Path, addr: SocketAddr) -> Server {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return Server::start_arbiter(state, listener).unwrap(),
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

#[test]
fn an_arbiter_only_server_answers_io_with_an_error_not_a_disconnect() {
    let dir = TempDir::new("arbiter-io");
    let server = start_arbiter(&dir.0.join("state"));
    let mut raw = raw_connect(server.local_addr());
    assert_eq!(send(&mut raw, 1, Op::Info).result, Ok(Reply::Info { size: 0, arbiter_only: true }));
    let io = [
        Op::Read { offset: 0, len: 512 },
        Op::Write { offset: 0, data: vec![1; 512], generation: 0 },
        Op::Flush { generation: 0 },
    ];
    for (i, op) in io.into_iter().enumerate() {
        let kind = op.kind();
        assert_eq!(send(&mut raw, i as u64 + 2, op).result, Err(DiskError::NoImage), "{kind}");
    }
    // Still connected, still arbitrating.
    assert_eq!(send(&mut raw, 9, Op::Owner).result, Ok(Reply::Owner { generation: 0, owner: String::new() }));
    let won = send(&mut raw, 10, Op::TestAndSet { expected_generation: 0, owner: "x".into() });
    assert_eq!(won.result, Ok(Reply::Won { generation: 1 }));
    let shown = DiskError::NoImage.to_string();
    assert!(shown.contains("arbiter-only") && !shown.contains('\n'), "{shown}");

    // A disk client is refused with a clear error.
    let err = DiskClient::connect(&server.local_addr().to_string(), TIMEOUT).unwrap_err();
    assert!(matches!(err, ClientError::NoDisk { .. }), "{err}");
    assert!(err.to_string().contains("arbiter-only"), "{err}");
}

#[test]
fn an_arbiter_client_uses_a_disk_servers_record_too() {
    let dir = TempDir::new("arbiter-disk");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let mut arb = arbiter(&server);
    assert_eq!(arb.kind(), ServerKind::Disk { size: 64 << 10 });
    let mut disk = client(&server);
    assert_eq!(disk.generation().unwrap(), 0);
    assert_eq!(arb.test_and_set(0, "backup@b").unwrap(), TasOutcome::Won { generation: 1 });
    // The same record fences the disk.
    assert_eq!(disk.generation().unwrap(), 1);
    assert_disk_error(disk.write(0, &block(1), 0), DiskError::Fenced { yours: 0, current: 1 });
    disk.write(0, &block(1), 1).unwrap();
}

#[test]
fn one_record_is_served_by_one_server_at_a_time() {
    let dir = TempDir::new("arbiter-lock");
    let listener = || TcpListener::bind("127.0.0.1:0").unwrap();
    let state = dir.0.join("state");
    let first = start_arbiter(&state);
    let second = Server::start_arbiter(&state, listener());
    assert!(matches!(second, Err(ServerError::RecordBusy(_))), "{:?}", second.err());
    drop(first);
    drop(Server::start_arbiter(&state, listener()).unwrap());

    // An arbiter on the record of an image being served is refused too.
    let image = dir.image(64 << 10);
    let disk = start(&image);
    let err = Server::start_arbiter(&dir.0.join("disk.img.owner"), listener()).err();
    assert!(matches!(err, Some(ServerError::RecordBusy(_))), "{err:?}");
    let shown = err.unwrap().to_string();
    assert!(!shown.contains('\n') && shown.contains("disk.img.owner"), "{shown}");
    drop(disk);
}

#[test]
fn an_arbiter_refuses_bad_state_files() {
    let dir = TempDir::new("arbiter-bad");
    let listener = || TcpListener::bind("127.0.0.1:0").unwrap();
    let state = dir.0.join("state");
    for damaged in ["", "ftdisk-owner 1\ngeneration 1\nowner \n", "junk\n"] {
        fs::write(&state, damaged).unwrap();
        let err = Server::start_arbiter(&state, listener()).err();
        assert!(matches!(err, Some(ServerError::OwnerRecord(_))), "{damaged:?}: {err:?}");
        assert!(!err.unwrap().to_string().contains('\n'));
    }
    // Never reset: the damaged file is still there.
    assert_eq!(fs::read_to_string(&state).unwrap(), "junk\n");
    let missing_dir = dir.0.join("no/such/dir/state");
    let err = Server::start_arbiter(&missing_dir, listener()).err();
    assert!(matches!(err, Some(ServerError::OwnerRecord(_))), "{err:?}");
    // A directory is not a state file.
    let sub = dir.0.join("sub");
    fs::create_dir(&sub).unwrap();
    let err = Server::start_arbiter(&sub, listener()).err();
    assert!(matches!(err, Some(ServerError::OwnerRecord(_))), "{err:?}");
}

#[test]
fn an_arbiter_race_has_one_winner_and_a_lost_answer_still_wins_once() {
    let dir = TempDir::new("arbiter-race");
    let server = start_arbiter(&dir.0.join("state"));
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let mut a = arbiter(&server);
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                a.test_and_set(0, &format!("vmm-{i}")).unwrap()
            })
        })
        .collect();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| matches!(o, TasOutcome::Won { generation: 1 })).count(), 1, "{outcomes:?}");

    // Frame 1 answers Info, frame 2 the test-and-set.
    let proxy = lossy_proxy(server.local_addr(), 2);
    let mut a = Arbiter::connect(&proxy.addr().to_string(), TIMEOUT).unwrap();
    assert_eq!(a.test_and_set(1, "backup@b").unwrap(), TasOutcome::Won { generation: 2 });
    assert_eq!(a.owner().unwrap(), (2, "backup@b".to_string()));
    let stats = server.stats();
    assert_eq!(stats.answered_from_memory, 1, "{stats:?}");
}

#[test]
fn an_arbiter_client_gives_up_after_retry_for() {
    let dir = TempDir::new("arbiter-gone");
    let server = start_arbiter(&dir.0.join("state"));
    let mut a = arbiter(&server);
    a.set_retry_for(Duration::from_millis(300));
    assert_eq!(a.retry_for(), Duration::from_millis(300));
    server.stop();
    let started = Instant::now();
    let err = a.test_and_set(0, "backup@b").unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let err = Arbiter::connect(a.addr(), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
}
