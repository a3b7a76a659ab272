//! The output regimes and the gate, unit by unit.

use super::*;
use crate::host::console::{OutputPort, MAX_BACKLOG};
use crate::host::disk::{DiskOp, DiskPort};
use crate::output::{Outputs, PendingOutputs};
use replay::Position;
use std::sync::{Arc, Mutex};

/// A writer whose bytes the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_gate_releases_output_in_order_once_acked() {
    let out = Shared::default();
    let port = OutputPort::to_writer(Box::new(out.clone()));
    let gate = OutputGate::new(port.sender(), None, None);
    gate.output(3, b"a".to_vec());
    gate.output(5, b"b".to_vec());
    gate.output(9, b"c".to_vec());
    gate.acked(2);
    assert_eq!(gate.held(), 3, "nothing acked yet");
    gate.acked(5);
    assert_eq!(gate.held(), 1);
    // Once acked beyond, new output still waits behind held output.
    gate.output(6, b"d".to_vec());
    assert_eq!(gate.held(), 2);
    gate.acked(u64::MAX);
    assert_eq!(gate.held(), 0);
    gate.output(10, b"e".to_vec());
    port.close();
    assert_eq!(&*out.0.lock().unwrap(), b"abcde");
    let (n, _, _, _) = gate.latency_stats().unwrap();
    assert_eq!(n, 3, "held outputs released by an ack are measured; the backup's loss is not an ack");
}

#[test]
fn suppressed_output_goes_live_with_what_the_primary_did_not_release() {
    let out = Shared::default();
    let mut s: Box<dyn Outputs> = Box::new(Suppressed::default());
    for exit in 1..=4 {
        s.output(pos(exit), vec![b'0' + exit as u8]);
    }
    s.prune(2, 0);
    s.prune(1, 0);
    s.go_live(OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
    s.output(pos(5), b"5".to_vec());
    s.close();
    assert_eq!(&*out.0.lock().unwrap(), b"345");
}

fn pos(exit: u64) -> Position {
    Position { exit, rip: 0 }
}

#[test]
fn suppressed_output_re_emits_only_what_was_not_released() {
    let mut s = Suppressed::default();
    for exit in 1..=5 {
        s.output(pos(exit), vec![exit as u8]);
    }
    s.prune(2, 0);
    assert_eq!(s.serial.exits().collect::<Vec<_>>(), vec![3, 4, 5]);
    s.prune(1, 0);
    assert_eq!(s.serial.exits().count(), 3, "a stale report prunes nothing more");
}

#[test]
fn a_backup_keeps_no_more_serial_output_than_the_console_backlog() {
    let mut s = Suppressed::default();
    // A primary whose console has no client reports nothing released:
    // the backup keeps the newest MAX_BACKLOG bytes, as the console does.
    let chunk = vec![b'x'; 1000];
    for exit in 1..=(3 * MAX_BACKLOG as u64 / 1000) {
        s.output(pos(exit), chunk.clone());
    }
    assert!(s.serial.len() <= MAX_BACKLOG);
    assert!(s.serial.len() > MAX_BACKLOG - 1000);
    assert_eq!(s.serial.exits().count(), s.serial.len() / 1000);
    let newest = s.serial.exits().last();
    assert_eq!(newest, Some(3 * MAX_BACKLOG as u64 / 1000), "the newest output stays");
    // Bytes of one exit share one mark.
    let mut t = Suppressed::default();
    for b in b"tick 1\n" {
        t.output(pos(7), vec![*b]);
    }
    assert_eq!(t.serial.exits().count(), 1);
    let out = Shared::default();
    t.go_live(OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
    Box::new(t).close();
    assert_eq!(&*out.0.lock().unwrap(), b"tick 1\n");
}

fn w(offset: u64, byte: u8) -> DiskOp {
    DiskOp::Write { offset, data: Arc::new(vec![byte; 512]) }
}

#[test]
fn without_a_backup_output_waits_for_the_disk_ops_before_it() {
    let out = Shared::default();
    let port = OutputPort::to_writer(Box::new(out.clone()));
    let gate = OutputGate::new(port.sender(), None, None);
    gate.acked(u64::MAX);
    gate.disk(1, 1, w(0, 1));
    gate.disk(1, 2, DiskOp::Flush);
    gate.output(2, b"OK".to_vec());
    assert_eq!(gate.held(), 1, "the reply waits for its write and flush");
    gate.disk_applied(1);
    assert_eq!(gate.held(), 1, "the flush is not applied yet");
    gate.disk_applied(2);
    assert_eq!(gate.held(), 0);
    // Output with no disk op before it that is unapplied goes at once.
    gate.output(3, b"!".to_vec());
    assert_eq!(gate.held(), 0);
    port.close();
    assert_eq!(&*out.0.lock().unwrap(), b"OK!");
}

#[test]
fn with_a_backup_output_waits_for_the_ack_alone_and_a_joined_backup_s_first_ack_releases_disk_waits() {
    let port = OutputPort::to_writer(Box::new(Shared::default()));
    let gate = OutputGate::new(port.sender(), None, None);
    gate.acked(u64::MAX);
    gate.disk(4, 1, w(0, 1));
    gate.output(5, b"a".to_vec());
    assert_eq!(gate.held(), 1);
    // A backup joins at exit 6. Until its first ack it may not have the
    // state (and the unapplied op in it): the output still waits.
    gate.protect_after(6);
    assert_eq!(gate.held(), 1);
    gate.disk(7, 2, w(0, 2));
    gate.output(8, b"b".to_vec());
    assert_eq!(gate.held(), 3);
    assert_eq!(gate.released(u64::MAX), 4);
    gate.acked(6);
    assert_eq!(gate.held(), 2, "acknowledged: the backup holds the op, the output may go");
    assert_eq!(gate.released(u64::MAX), 6);
    gate.acked(8);
    assert_eq!(gate.held(), 0, "acknowledged: out, whatever the storage did");
    port.close();
}

#[test]
fn the_backup_keeps_disk_ops_by_number_and_re_issues_them_before_other_output() {
    let mut s = Suppressed::default();
    // Three ops of one exit: the primary applied the first only.
    s.disk(pos(5), 1, &w(0, 1));
    s.disk(pos(5), 2, &w(512, 2));
    s.disk(pos(5), 3, &DiskOp::Flush);
    s.output(pos(6), b"done".to_vec());
    s.prune(5, 1);
    assert_eq!(s.disk.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(s.serial.exits().count(), 1, "released by exit: exit 6 was not");
    assert_eq!(s.kept_disk_peak(), 1024);
    let mut data = vec![0u8; 1024];
    s.lay_kept_writes(0, &mut data);
    assert_eq!(&data[..512], &[0; 512][..], "op 1 is on the storage, not kept");
    assert_eq!(&data[512..], &[2; 512][..]);
    s.prune(0, 3);
    assert!(s.disk.is_empty());
    assert_eq!(s.disk_bytes, 0);
}

#[test]
fn a_state_s_pending_outputs_replace_the_backup_s_own() {
    let mut s = Suppressed::default();
    s.output(pos(3), b"mine".to_vec());
    s.disk(pos(3), 1, &w(0, 9));
    s.prune(0, 0);
    let pending = PendingOutputs {
        disk: vec![(4, w(0, 1)), (5, DiskOp::Flush)],
        serial: vec![(2, b"theirs".to_vec())],
        frames: vec![(2, vec![1, 2, 3])],
    };
    s.take_over(pending);
    assert_eq!(s.disk.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(s.serial.to_vec(), vec![(2, b"theirs".to_vec())]);
    assert_eq!(s.frames.len(), 1);
    let out = Shared::default();
    s.go_live(OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
    assert!(s.disk.is_empty());
    Box::new(s).close();
    assert_eq!(&*out.0.lock().unwrap(), b"theirs");
}

/// Storage that records, at each write and flush, whether any console
/// output had been written by then.
struct OrderWitness {
    console: Shared,
    seen_output: Arc<Mutex<Vec<bool>>>,
}

impl crate::host::disk::BlockBackend for OrderWitness {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&mut self, _offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        Ok(vec![0; len])
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        let seen = !self.console.0.lock().unwrap().is_empty();
        self.seen_output.lock().unwrap().push(seen);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.write(0, &[])
    }
}

#[test]
fn going_live_re_issues_and_flushes_the_disk_before_any_other_output() {
    let console = Shared::default();
    let seen_output = Arc::new(Mutex::new(Vec::new()));
    let storage = OrderWitness { console: console.clone(), seen_output: seen_output.clone() };
    let disk = DiskPort::new(Box::new(storage));
    let mut s = Suppressed::default();
    s.disk(pos(1), 1, &w(0, 1));
    s.output(pos(2), b"written\n".to_vec());
    s.disk(pos(3), 2, &w(512, 2));
    s.output(pos(4), b"again\n".to_vec());
    s.go_live(OutputPort::to_writer(Box::new(console.clone())), Some(&disk), None).unwrap();
    Box::new(s).close();
    assert_eq!(&*console.0.lock().unwrap(), b"written\nagain\n");
    // Two writes and the closing flush, all before the first byte out.
    assert_eq!(*seen_output.lock().unwrap(), vec![false, false, false]);
    assert_eq!(disk.applied_through(), 2);
}
