//! Tests of the engine as a client sees it: bytes in, replies out.

use crate::log::tests::{store, MemDisk};
use crate::log::{Journal, MIN_BUFFER, SECTOR};
use crate::{Engine, Fed, NoDisk, Sink, Status, MAX_KEY, MAX_VALUE};

const MAX_REQUEST: usize = 16 * 1024;

fn engine(keys: usize) -> Engine<'static, NoDisk> {
    Engine::new(store(keys), None, MAX_REQUEST)
}

/// Feeds `input` and returns (replies, what feed said).
fn feed<D: crate::BlockDev>(e: &mut Engine<D>, input: &[u8]) -> (String, Fed) {
    let mut out = Vec::new();
    let fed = e.feed(input, &mut out);
    (String::from_utf8_lossy(&out).into_owned(), fed)
}

/// Feeds `input`, expecting it all consumed, and returns the replies.
fn replies<D: crate::BlockDev>(e: &mut Engine<D>, input: &[u8]) -> String {
    let (out, fed) = feed(e, input);
    assert_eq!(
        fed,
        Fed { consumed: input.len(), status: Status::NeedInput },
        "input {:?}",
        String::from_utf8_lossy(input)
    );
    out
}

/// A RESP request.
fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// A sink with a fixed capacity.
struct Bounded {
    data: Vec<u8>,
    cap: usize,
}

impl Sink for Bounded {
    fn room(&self) -> usize {
        self.cap - self.data.len()
    }
    fn capacity(&self) -> usize {
        self.cap
    }
    fn put(&mut self, data: &[u8]) {
        assert!(data.len() <= self.room(), "put past the room");
        self.data.extend_from_slice(data);
    }
}

#[test]
fn basic_commands() {
    let mut e = engine(16);
    assert_eq!(replies(&mut e, &cmd(&[b"PING"])), "+PONG\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"ping", b"hi"])), "$2\r\nhi\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"ECHO", b"a\r\nb"])), "$4\r\na\r\nb\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"k"])), "$-1\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"k", b"v"])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"get", b"k"])), "$1\r\nv\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"k", b""])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"k"])), "$0\r\n\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"EXISTS", b"k", b"k", b"nope"])), ":2\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"MSET", b"a", b"1", b"b", b"2"])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"MGET", b"a", b"x", b"b"])), "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DBSIZE"])), ":3\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DEL", b"a", b"a", b"x", b"b"])), ":2\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DBSIZE"])), ":1\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"FLUSHALL"])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DBSIZE"])), ":0\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SELECT", b"0"])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SELECT", b"1"])), "-ERR DB index is out of range\r\n");
}

#[test]
fn counters() {
    let mut e = engine(16);
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", b"n"])), ":1\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"INCRBY", b"n", b"41"])), ":42\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DECR", b"n"])), ":41\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DECRBY", b"n", b"-9"])), ":50\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"n"])), "$2\r\n50\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DECRBY", b"m", b"5"])), ":-5\r\n");

    let not_int = "-ERR value is not an integer or out of range\r\n";
    replies(&mut e, &cmd(&[b"SET", b"s", b"abc"]));
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", b"s"])), not_int);
    replies(&mut e, &cmd(&[b"SET", b"s", b" 1"]));
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", b"s"])), not_int);
    assert_eq!(replies(&mut e, &cmd(&[b"INCRBY", b"n", b"1.5"])), not_int);
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"s"])), "$2\r\n 1\r\n", "unchanged");

    let overflow = "-ERR increment or decrement would overflow\r\n";
    replies(&mut e, &cmd(&[b"SET", b"big", b"9223372036854775807"]));
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", b"big"])), overflow);
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"big"])), "$19\r\n9223372036854775807\r\n");
    replies(&mut e, &cmd(&[b"SET", b"small", b"-9223372036854775808"]));
    assert_eq!(replies(&mut e, &cmd(&[b"DECR", b"small"])), overflow);
    assert_eq!(replies(&mut e, &cmd(&[b"DECRBY", b"n", b"-9223372036854775808"])), not_int);
    assert_eq!(replies(&mut e, &cmd(&[b"INCRBY", b"small", b"9223372036854775807"])), ":-1\r\n");
}

#[test]
fn pipelined_and_case_insensitive() {
    let mut e = engine(16);
    let mut input = Vec::new();
    for i in 0..50 {
        input.extend(cmd(&[b"sEt", format!("k{i}").as_bytes(), format!("{i}").as_bytes()]));
        input.extend(cmd(&[b"incr", format!("k{i}").as_bytes()]));
    }
    input.extend(b"PING\r\nget k7\r\n");
    let mut e2 = engine(64);
    let out = replies(&mut e2, &input);
    let expected: String =
        (0..50).map(|i| format!("+OK\r\n:{}\r\n", i + 1)).collect::<String>() + "+PONG\r\n$1\r\n8\r\n";
    assert_eq!(out, expected);
    assert_eq!(replies(&mut e, b"*1\r\n$4\r\nping\r\n*1\r\n$4\r\nPiNg\r\n"), "+PONG\r\n+PONG\r\n");
}

#[test]
fn partial_input_waits_for_the_rest() {
    let mut e = engine(16);
    let first = cmd(&[b"SET", b"key", b"value"]);
    let second = cmd(&[b"GET", b"key"]);
    let all = [first.clone(), second.clone()].concat();
    // Every split point: what comes before is answered, the rest waits.
    for cut in 0..all.len() {
        let mut e = engine(16);
        let (out, fed) = feed(&mut e, &all[..cut]);
        let done = if cut >= first.len() { first.len() } else { 0 };
        assert_eq!(fed, Fed { consumed: done, status: Status::NeedInput }, "cut at {cut}");
        assert_eq!(out, if done > 0 { "+OK\r\n" } else { "" });
        let (out, fed) = feed(&mut e, &all[done..]);
        assert_eq!(fed.consumed, all.len() - done);
        assert!(out.ends_with("$5\r\nvalue\r\n"), "cut at {cut}: {out:?}");
    }
    // An inline command without its newline yet.
    assert_eq!(feed(&mut e, b"PIN").1, Fed { consumed: 0, status: Status::NeedInput });
    assert_eq!(replies(&mut e, b"PING\n"), "+PONG\r\n");
}

#[test]
fn malformed_input_closes_after_an_error() {
    for bad in [&b"*1\r\n+PING\r\n"[..], b"*x\r\n", b"*2\r\n$3\r\nGET\r\n$1\r\nkXX\r\n", b"*1\r\n$-5\r\n"] {
        let mut e = engine(4);
        let mut input = cmd(&[b"SET", b"a", b"1"]);
        let good = input.len();
        input.extend_from_slice(bad);
        input.extend(cmd(&[b"SET", b"b", b"2"]));
        let (out, fed) = feed(&mut e, &input);
        assert_eq!(fed, Fed { consumed: input.len(), status: Status::Close }, "{:?}", String::from_utf8_lossy(bad));
        assert!(out.starts_with("+OK\r\n-ERR Protocol error"), "{out:?}");
        assert!(good > 0);
        // Nothing after the error was executed.
        assert_eq!(replies(&mut e, &cmd(&[b"EXISTS", b"a", b"b"])), ":1\r\n");
    }
}

#[test]
fn request_too_large_for_the_buffer() {
    let mut e = engine(4);
    let mut input = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n", 100_000).into_bytes();
    input.resize(MAX_REQUEST, b'x');
    let (out, fed) = feed(&mut e, &input);
    assert_eq!(fed.status, Status::Close);
    assert!(out.starts_with("-ERR Protocol error: request too large"), "{out:?}");
}

#[test]
fn oversize_keys_and_values_are_refused() {
    let mut e = engine(4);
    let too_long = "-ERR key or value too long (at most 512 bytes each)\r\n";
    let key = vec![b'k'; MAX_KEY];
    let value = vec![b'v'; MAX_VALUE];
    assert_eq!(replies(&mut e, &cmd(&[b"SET", &key, &value])), "+OK\r\n");
    let longer_key = vec![b'k'; MAX_KEY + 1];
    let longer_value = vec![b'w'; MAX_VALUE + 1];
    assert_eq!(replies(&mut e, &cmd(&[b"SET", &longer_key, b"v"])), too_long);
    assert_eq!(replies(&mut e, &cmd(&[b"SET", &key, &longer_value])), too_long);
    assert_eq!(replies(&mut e, &cmd(&[b"MSET", b"a", b"1", &key, &longer_value])), too_long);
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", &longer_key])), too_long);
    assert_eq!(replies(&mut e, &cmd(&[b"GET", &longer_key])), "$-1\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"DBSIZE"])), ":1\r\n");
    let reply = replies(&mut e, &cmd(&[b"GET", &key]));
    assert_eq!(reply, format!("$512\r\n{}\r\n", "v".repeat(512)), "unchanged");
}

#[test]
fn full_store_refuses_new_keys_and_stays_intact() {
    let mut e = engine(3);
    assert_eq!(replies(&mut e, &cmd(&[b"MSET", b"a", b"1", b"b", b"2", b"a", b"3"])), "+OK\r\n");
    let full = "-ERR store full: the write was not done\r\n";
    assert_eq!(replies(&mut e, &cmd(&[b"MSET", b"c", b"3", b"d", b"4"])), full);
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"c", b"3"])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"d", b"4"])), full);
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", b"d"])), full);
    // Existing keys still change.
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"a", b"9"])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"INCR", b"a"])), ":10\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"MSET", b"b", b"x", b"c", b"y"])), "+OK\r\n");
    assert_eq!(
        replies(&mut e, &cmd(&[b"MGET", b"a", b"b", b"c", b"d"])),
        "*4\r\n$2\r\n10\r\n$1\r\nx\r\n$1\r\ny\r\n$-1\r\n"
    );
    assert_eq!(replies(&mut e, &cmd(&[b"DBSIZE"])), ":3\r\n");
}

#[test]
fn ten_thousand_keys() {
    let mut e = engine(10_000);
    let mut input = Vec::new();
    for i in 0..10_000 {
        input.extend(cmd(&[b"SET", format!("key:{i:012}").as_bytes(), b"xxx"]));
        if input.len() > 8000 {
            let out = replies(&mut e, &input);
            assert!(out.bytes().all(|b| b"+OK\r\n".contains(&b)), "{out}");
            input.clear();
        }
    }
    replies(&mut e, &input);
    assert_eq!(replies(&mut e, &cmd(&[b"DBSIZE"])), ":10000\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"key:000000004242"])), "$3\r\nxxx\r\n");
}

#[test]
fn unknown_and_startup_commands() {
    let mut e = engine(4);
    assert_eq!(
        replies(&mut e, &cmd(&[b"FOO", b"a", b"b\r\n"])),
        "-ERR unknown command 'FOO', with args beginning with: 'a' 'b  ' \r\n"
    );
    assert_eq!(replies(&mut e, &cmd(&[b"GET"])), "-ERR wrong number of arguments for 'get' command\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"k"])), "-ERR wrong number of arguments for 'set' command\r\n");
    assert!(replies(&mut e, &cmd(&[b"SET", b"k", b"v", b"EX", b"10"])).starts_with("-ERR syntax error"));
    assert_eq!(replies(&mut e, &cmd(&[b"MSET", b"a"])), "-ERR wrong number of arguments for 'mset' command\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"COMMAND", b"DOCS"])), "*0\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"COMMAND"])), "*0\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"CONFIG", b"GET", b"save"])), "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"CONFIG", b"GET", b"appendonly"])), "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"CONFIG", b"GET", b"maxmemory"])), "*0\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"CLIENT", b"SETNAME", b"x"])), "+OK\r\n");
    assert!(replies(&mut e, &cmd(&[b"HELLO", b"3"])).starts_with("-NOPROTO"));
    assert!(replies(&mut e, &cmd(&[b"HELLO"])).starts_with("*14\r\n$6\r\nserver\r\n"));
    assert!(replies(&mut e, &cmd(&[b"INFO"])).contains("redis_version:"));
    let (out, fed) = feed(&mut e, &[cmd(&[b"QUIT"]), cmd(&[b"PING"])].concat());
    assert_eq!((out.as_str(), fed.status, fed.consumed), ("+OK\r\n", Status::Close, 14));
    let (out, fed) = feed(&mut e, &[cmd(&[b"PING"]), cmd(&[b"SHUTDOWN"]), cmd(&[b"PING"])].concat());
    assert_eq!((out.as_str(), fed.status, fed.consumed), ("+PONG\r\n", Status::Shutdown, 32));
}

#[test]
fn a_full_output_stops_parsing_without_losing_anything() {
    let mut e = engine(16);
    replies(&mut e, &cmd(&[b"SET", b"k", &[b'v'; 500]]));
    let mut input = Vec::new();
    for _ in 0..20 {
        input.extend(cmd(&[b"GET", b"k"]));
        input.extend(cmd(&[b"INCR", b"n"]));
    }
    // A transmit buffer of 2 KiB, drained between calls.
    let mut sink = Bounded { data: Vec::new(), cap: 2048 };
    let mut all = Vec::new();
    let mut pos = 0;
    let mut rounds = 0;
    while pos < input.len() {
        let fed = e.feed(&input[pos..], &mut sink);
        assert!(matches!(fed.status, Status::NeedRoom | Status::NeedInput));
        assert!(fed.consumed > 0 || !sink.data.is_empty(), "no progress");
        pos += fed.consumed;
        all.append(&mut sink.data);
        rounds += 1;
    }
    assert!(rounds > 3);
    let get = format!("$500\r\n{}\r\n", "v".repeat(500));
    let expected: String = (1..=20).map(|i| format!("{get}:{i}\r\n")).collect();
    assert_eq!(String::from_utf8(all).unwrap(), expected);
}

#[test]
fn a_reply_larger_than_the_buffer_is_an_error() {
    let mut e = engine(16);
    for k in [&b"a"[..], b"b", b"c", b"d"] {
        replies(&mut e, &cmd(&[b"SET", k, &[b'v'; 500]]));
    }
    let mut sink = Bounded { data: Vec::new(), cap: 1024 };
    let input = cmd(&[b"MGET", b"a", b"b", b"c", b"d"]);
    let fed = e.feed(&input, &mut sink);
    assert_eq!(fed, Fed { consumed: input.len(), status: Status::NeedInput });
    assert_eq!(sink.data, b"-ERR reply too large for this server\r\n");
}

#[test]
fn writes_are_logged_and_replayed() {
    let mut disk = MemDisk::new(2048);
    {
        let buf = Box::leak(vec![0u8; MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice());
        let mut s = store(64);
        let (journal, _) = Journal::open(&mut disk, buf, &mut s).unwrap();
        let mut e = Engine::new(s, Some(journal), MAX_REQUEST);
        let mut input = Vec::new();
        input.extend(cmd(&[b"SET", b"a", b"1"]));
        input.extend(cmd(&[b"MSET", b"b", b"2", b"c", b"3"]));
        input.extend(cmd(&[b"INCR", b"a"]));
        input.extend(cmd(&[b"INCRBY", b"n", b"5"]));
        input.extend(cmd(&[b"DEL", b"c", b"zz"]));
        input.extend(cmd(&[b"DEL", b"zz"]));
        input.extend(cmd(&[b"INCR", b"b"]));
        input.extend(cmd(&[b"SET", b"x", &[b'v'; 513]]));
        input.extend(cmd(&[b"GET", b"a"]));
        assert_eq!(replies(&mut e, &input), "+OK\r\n+OK\r\n:2\r\n:5\r\n:1\r\n:0\r\n:3\r\n-ERR key or value too long (at most 512 bytes each)\r\n$1\r\n2\r\n");
        assert!(e.journal().unwrap().has_pending(), "nothing is on disk before the commit");
        assert!(e.commit());
        assert_eq!(e.journal().unwrap().records(), 6, "reads, refused writes and no-op DELs are not logged");
        assert_eq!(e.journal().unwrap().device().writes, 1, "one write for the whole round");
        assert_eq!(replies(&mut e, &cmd(&[b"FLUSHALL"])), "+OK\r\n");
        assert_eq!(replies(&mut e, &cmd(&[b"SET", b"after", b"flush"])), "+OK\r\n");
        assert!(e.commit());
    }
    let buf = Box::leak(vec![0u8; MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice());
    let mut s = store(64);
    let (journal, loaded) = Journal::open(&mut disk, buf, &mut s).unwrap();
    assert_eq!(loaded.records, 8);
    let mut e = Engine::new(s, Some(journal), MAX_REQUEST);
    assert_eq!(replies(&mut e, &cmd(&[b"MGET", b"a", b"b", b"after"])), "*3\r\n$-1\r\n$-1\r\n$5\r\nflush\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"CONFIG", b"GET", b"appendonly"])), "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n");
}

#[test]
fn replay_restores_the_store() {
    let mut disk = MemDisk::new(4096);
    let mut expected = Vec::new();
    {
        let buf = Box::leak(vec![0u8; MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice());
        let mut s = store(1000);
        let (journal, _) = Journal::open(&mut disk, buf, &mut s).unwrap();
        let mut e = Engine::new(s, Some(journal), MAX_REQUEST);
        for i in 0..600u32 {
            let key = format!("k{}", i % 300);
            let value = "x".repeat((i as usize * 13) % 512);
            replies(&mut e, &cmd(&[b"SET", key.as_bytes(), value.as_bytes()]));
            if i % 7 == 0 {
                replies(&mut e, &cmd(&[b"DEL", format!("k{}", i % 11).as_bytes()]));
            }
            if i % 50 == 0 {
                assert!(e.commit());
            }
        }
        assert!(e.commit());
        for i in 0..300 {
            expected.push(replies(&mut e, &cmd(&[b"GET", format!("k{i}").as_bytes()])));
        }
    }
    let buf = Box::leak(vec![0u8; MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice());
    let mut s = store(1000);
    let (journal, _) = Journal::open(&mut disk, buf, &mut s).unwrap();
    let mut e = Engine::new(s, Some(journal), MAX_REQUEST);
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&replies(&mut e, &cmd(&[b"GET", format!("k{i}").as_bytes()])), want, "k{i}");
    }
}

#[test]
fn disk_full_refuses_writes_and_io_errors_fail_the_engine() {
    let mut disk = MemDisk::new(1);
    let buf = Box::leak(vec![0u8; MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice());
    let mut s = store(64);
    let (journal, _) = Journal::open(&mut disk, buf, &mut s).unwrap();
    let mut e = Engine::new(s, Some(journal), MAX_REQUEST);
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"a", &[b'v'; 400]])), "+OK\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"b", &[b'v'; 400]])), "-ERR disk full: the write was not done\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"EXISTS", b"b"])), ":0\r\n");
    assert!(e.commit());
    assert!(!e.failed());
    assert_eq!(replies(&mut e, &cmd(&[b"DEL", b"a"])), "-ERR disk full: the write was not done\r\n");
    assert_eq!(replies(&mut e, &cmd(&[b"GET", b"a"])), format!("$400\r\n{}\r\n", "v".repeat(400)));

    let mut disk = MemDisk::new(64);
    let buf = Box::leak(vec![0u8; MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice());
    let mut s = store(64);
    let (journal, _) = Journal::open(&mut disk, buf, &mut s).unwrap();
    let mut e = Engine::new(s, Some(journal), MAX_REQUEST);
    assert_eq!(replies(&mut e, &cmd(&[b"SET", b"a", b"1"])), "+OK\r\n");
    assert!(e.commit());
    e.journal().unwrap().device().fail_writes = true;
    assert_eq!(replies(&mut e, &cmd(&[b"DEL", b"a"])), ":1\r\n");
    assert!(!e.commit());
    assert!(e.failed());
}

#[test]
fn garbage_never_panics() {
    // A small deterministic fuzz: random bytes and mutated requests.
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let samples =
        [cmd(&[b"SET", b"k", b"v"]), cmd(&[b"INCRBY", b"n", b"-3"]), cmd(&[b"MGET", b"k", b"n"]), b"PING\r\n".to_vec()];
    for _ in 0..3000 {
        let mut e = engine(8);
        let mut input = Vec::new();
        for _ in 0..(next() % 6) {
            let mut s = samples[(next() % 4) as usize].clone();
            for _ in 0..(next() % 3) {
                let at = (next() as usize) % s.len();
                s[at] = next() as u8;
            }
            input.extend(s);
        }
        let mut buf = [0u8; 4096];
        let mut sink = crate::BufSink::new(&mut buf);
        let mut pos = 0;
        loop {
            let fed = e.feed(&input[pos..], &mut sink);
            pos += fed.consumed;
            assert!(pos <= input.len());
            sink.clear();
            if fed.status != Status::NeedRoom || fed.consumed == 0 {
                break;
            }
        }
    }
}
