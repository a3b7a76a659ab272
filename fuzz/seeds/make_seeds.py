#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets log_reader, channel_frames and
ftdisk_requests into this directory: a few valid messages of each format,
in bincode's varint encoding, so the fuzzers start from real frames. (The
snapshot_reader seeds are written by vmm/tests/proptest_snapshot.rs with
FTVMM_FUZZ_SEEDS=fuzz/seeds; virtio_queues needs none.)

    python3 fuzz/seeds/make_seeds.py
"""
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def uv(n):
    """bincode varint of an unsigned integer (u16, u32, u64, lengths, variant indices)."""
    if n < 251:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfb" + struct.pack("<H", n)
    if n < 1 << 32:
        return b"\xfc" + struct.pack("<I", n)
    return b"\xfd" + struct.pack("<Q", n)


def u8(n):
    return bytes([n])


def byte_string(b):
    return uv(len(b)) + b


def text(s):
    return byte_string(s.encode())


def digest(fill):
    return bytes([fill]) * 32


def header():
    return digest(3) + text("mem_mib=64 image=ticker") + uv(1_700_000_000_000_000_000) + uv(2)


def record(exit, rip, entry):
    return uv(exit) + uv(rip) + entry


def exit_io_out(port, size):
    return uv(0) + uv(1) + uv(port) + u8(size)


def exit_mmio_write(addr, size):
    return uv(0) + uv(3) + uv(addr) + u8(size)


def exit_hlt():
    return uv(0) + uv(4)


def ev_interrupt(v):
    return uv(1) + uv(0) + u8(v)


def ev_time(source, ns):
    return uv(1) + uv(1) + uv(source) + uv(ns)


def ev_serial(b):
    return uv(1) + uv(2) + byte_string(b)


def ev_disk(b):
    return uv(1) + uv(3) + byte_string(b)


def ev_net(b):
    return uv(1) + uv(4) + byte_string(b)


def end(status):
    return uv(2) + u8(status) + digest(7)


def records():
    return [
        record(1, 0x100000, exit_io_out(0x3F8, 1)),
        record(1, 0x100000, ev_time(1, 1_000_000)),
        record(1, 0x100000, ev_interrupt(0x20)),
        record(2, 0x100010, exit_mmio_write(0xD0000050, 4)),
        record(2, 0x100010, ev_disk(bytes(range(64)))),
        record(3, 0x100020, exit_hlt()),
        record(3, 0x100020, ev_serial(b"hi\n")),
        record(3, 0x100020, ev_net(b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x06" + b"\x00" * 46)),
        record(4, 0x100030, end(0)),
    ]


def leb128(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n == 0:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def log_frame(payload):
    return leb128(len(payload)) + payload + struct.pack("<I", zlib.crc32(payload))


def u16_payloads(payloads):
    return b"\x01" + b"".join(struct.pack("<H", len(p)) + p for p in payloads)


def channel_frame(payload):
    return struct.pack("<I", len(payload)) + payload


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    # replay log: the file itself, and (first byte 1) its frames' payloads.
    log = b"FTVMMLOG" + struct.pack("<I", 3) + log_frame(header()) + b"".join(log_frame(r) for r in records())
    write("log_reader", "log", log)
    write("log_reader", "payloads", u16_payloads([header()] + records()))

    # logging channel: a primary's stream and a backup's.
    batch = uv(3) + uv(1) + uv(4) + uv(3) + uv(len(records())) + b"".join(records())
    primary = (
        b"FTVMMLCH"
        + struct.pack("<I", 2)
        + channel_frame(uv(0) + header() + uv(1))  # Hello, LogStart::State
        + channel_frame(uv(7) + uv(0) + byte_string(b"FTVMSNAP" + bytes(40)))  # State
        + channel_frame(uv(8) + uv(77) + uv(48))  # StateEnd
        + channel_frame(batch)
        + channel_frame(uv(5))  # Heartbeat
        + channel_frame(uv(6))  # Done
    )
    write("channel_frames", "primary", primary)
    backup = (
        b"FTVMMLCH"
        + struct.pack("<I", 2)
        + channel_frame(uv(1))  # Welcome
        + channel_frame(uv(9) + uv(48))  # StateAck
        + channel_frame(uv(4) + uv(1) + uv(4))  # Ack
        + channel_frame(uv(2) + text("another guest image"))  # Reject
    )
    write("channel_frames", "backup", backup)
    write("channel_frames", "batch_payload", batch)

    # ftdisk: a client's requests, and a response payload.
    def request(seq, op):
        return uv(0x1234_5678_9ABC) + uv(seq) + op

    requests = [
        request(1, uv(5)),  # Info
        request(2, uv(4)),  # Owner
        request(3, uv(3) + uv(0) + text("backup pid 42 on host-b")),  # TestAndSet
        request(4, uv(1) + uv(4096) + byte_string(bytes(range(256)) * 2) + uv(1)),  # Write
        request(5, uv(0) + uv(4096) + uv(512)),  # Read
        request(6, uv(2) + uv(1)),  # Flush
    ]
    stream = b"FTDISK01" + struct.pack("<I", 2) + b"".join(channel_frame(r) for r in requests)
    write("ftdisk_requests", "requests", stream)
    write("ftdisk_requests", "response_data", uv(5) + uv(0) + uv(0) + byte_string(b"\xaa" * 512))
    write("ftdisk_requests", "response_fenced", uv(4) + uv(1) + uv(1) + uv(1) + uv(2))


if __name__ == "__main__":
    main()
