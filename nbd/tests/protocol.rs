//! The NBD server byte by byte: a raw client over real TCP against in-memory exports.
//! Negotiation answers, simple and structured replies, errors, read-only, multi-conn,
//! concurrency, and malformed input (fixed cases and a seeded random fuzz).

mod support;

use rand::{Rng, SeedableRng};
use rawfs_nbd::proto::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;
use support::{Raw, TestServer, DISK_SIZE};

fn name(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

#[test]
fn negotiation_answers_every_option() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    c.option(OPT_LIST, &[]);
    let r = c.opt_replies();
    let names: Vec<String> = r
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).expect("utf8")
        })
        .collect();
    assert_eq!(names, ["disk", "ro", "small"]);
    assert_eq!(r.last().map(|r| r.kind), Some(REP_ACK));

    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.option(99, b"whatever");
    assert_eq!(c.opt_reply().kind, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply().kind, REP_ERR_UNSUP);
    let mut d = name("nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_INFO, &d);
    assert_eq!(c.opt_reply().kind, REP_ERR_UNKNOWN);
    c.option(OPT_INFO, &[0, 0, 0]);
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    let mut q = name("disk");
    q.extend_from_slice(&0u32.to_be_bytes());
    c.option(OPT_LIST_META_CONTEXT, &q);
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.structured();
    c.option(OPT_LIST_META_CONTEXT, &q);
    let r = c.opt_replies();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], BASE_ALLOCATION.as_bytes());
    let mut unknown = name("disk");
    unknown.extend_from_slice(&1u32.to_be_bytes());
    unknown.extend_from_slice(&name("qemu:dirty-bitmap:b"));
    c.option(OPT_SET_META_CONTEXT, &unknown);
    let r = c.opt_replies();
    assert_eq!(r.len(), 1, "nothing selected: {r:?}");
    assert_eq!(r[0].kind, REP_ACK);

    // INFO with name and block size.
    let mut d = name("ro");
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    c.option(OPT_INFO, &d);
    let r = c.opt_replies();
    assert_eq!(r.last().map(|r| r.kind), Some(REP_ACK));
    let info = |t: u16| {
        r.iter()
            .find(|x| x.kind == REP_INFO && x.data[0..2] == t.to_be_bytes())
            .unwrap_or_else(|| panic!("info {t} in {r:?}"))
    };
    let e = info(INFO_EXPORT);
    assert_eq!(&e.data[2..10], &(1u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([e.data[10], e.data[11]]);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(
        flags & FLAG_SEND_DF,
        0,
        "structured replies were negotiated"
    );
    assert_eq!(&info(INFO_NAME).data[2..], b"ro");
    let b = &info(INFO_BLOCK_SIZE).data;
    assert_eq!(&b[2..6], &1u32.to_be_bytes());
    assert_eq!(&b[6..10], &(64u32 << 10).to_be_bytes());
    assert_eq!(&b[10..14], &(32u32 << 20).to_be_bytes());

    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    assert!(c.closed_by_server());
}

#[test]
fn simple_replies_serve_reads_writes_and_errors() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    let (size, flags) = c.go("disk");
    assert_eq!(size, DISK_SIZE);
    for f in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_CACHE,
        FLAG_SEND_FAST_ZERO,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }
    assert_eq!(flags & (FLAG_READ_ONLY | FLAG_SEND_DF), 0);

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 1 << 20, 8192, &data);
    assert_eq!(c.simple(0), (0, 1, vec![]));
    c.request(CMD_READ, 0, 2, 1 << 20, 8192, &[]);
    let (err, h, back) = c.simple(8192);
    assert_eq!((err, h), (0, 2));
    assert_eq!(back, data);
    // Out of range: EINVAL for reads, ENOSPC for writes (whose payload is skipped).
    c.request(CMD_READ, 0, 3, DISK_SIZE - 1, 2, &[]);
    assert_eq!(c.simple(2).0, EINVAL);
    c.request(CMD_WRITE, 0, 4, DISK_SIZE, 3, b"abc");
    assert_eq!(c.simple(0).0, ENOSPC);
    c.request(42, 0, 5, 0, 0, &[]);
    assert_eq!(c.simple(0), (EINVAL, 5, vec![]));
    c.request(CMD_WRITE, 1 << 9, 6, 0, 1, b"z");
    assert_eq!(c.simple(0).0, EINVAL, "unknown flag");
    // Oversized requests are refused without allocating: READ at once, WRITE after its
    // payload is skipped.
    c.request(CMD_READ, 0, 7, 0, u32::MAX, &[]);
    assert_eq!(c.simple(0).0, EINVAL);
    c.request(CMD_TRIM, 0, 8, 1 << 20, 4096, &[]);
    assert_eq!(c.simple(0).0, 0);
    c.request(CMD_READ, 0, 9, 1 << 20, 8, &[]);
    assert_eq!(c.simple(8).2, vec![0u8; 8], "trimmed range reads as zeros");
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE,
        10,
        (1 << 20) + 4096,
        4096,
        &[],
    );
    assert_eq!(c.simple(0).0, 0);
    // A fast zero punches; one that must not leave a hole would be written as data: refused
    // at once, and the data stays.
    c.request(CMD_WRITE, 0, 19, 1 << 20, 8192, &data);
    assert_eq!(c.simple(0).0, 0);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 20, 1 << 20, 4096, &[]);
    assert_eq!(c.simple(0).0, 0);
    c.request(CMD_READ, 0, 21, (1 << 20) + 4090, 12, &[]);
    assert_eq!(c.simple(12).2, [&[0u8; 6][..], &data[4096..4102]].concat());
    let fast_no_hole = CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE;
    c.request(
        CMD_WRITE_ZEROES,
        fast_no_hole,
        22,
        (1 << 20) + 4096,
        4096,
        &[],
    );
    assert_eq!(c.simple(0).0, ENOTSUP);
    c.request(CMD_READ, 0, 23, (1 << 20) + 4096, 8, &[]);
    assert_eq!(c.simple(8).2, &data[4096..4104]);
    // CACHE reads ahead and answers like a read would: fine in range, EINVAL past the end.
    c.request(CMD_CACHE, 0, 24, 0, 16 << 20, &[]);
    assert_eq!(c.simple(0), (0, 24, vec![]));
    c.request(CMD_CACHE, 0, 25, DISK_SIZE - 1, 2, &[]);
    assert_eq!(c.simple(0).0, EINVAL);
    c.request(CMD_FLUSH, 0, 11, 0, 0, &[]);
    assert_eq!(c.simple(0), (0, 11, vec![]));
    c.request(CMD_DISC, 0, 12, 0, 0, &[]);
    assert!(c.closed_by_server());
    support::wait_for("the connection to close", Duration::from_secs(10), || {
        srv.catalog.connections("disk") == 0
    });
}

#[test]
fn structured_replies_carry_data_errors_and_block_status() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    c.structured();
    c.set_base_allocation("disk");
    let (_, flags) = c.go("disk");
    assert_ne!(flags & FLAG_SEND_DF, 0);
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 1 << 20, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.kind, ch.flags, ch.handle),
        (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, 1)
    );
    assert_eq!(&ch.payload[0..4], &BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(&ch.payload[4..8], &(1u32 << 20).to_be_bytes());
    assert_eq!(&ch.payload[8..12], &(STATE_HOLE | STATE_ZERO).to_be_bytes());

    c.request(CMD_WRITE, 0, 2, 128 << 10, 5, b"hello");
    assert_eq!(c.simple(0).0, 0);
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 1 << 20, &[]);
    let ch = c.chunk();
    let descs: Vec<(u32, u32)> = ch.payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
            )
        })
        .collect();
    assert_eq!(
        descs,
        vec![
            (128 << 10, STATE_HOLE | STATE_ZERO),
            (64 << 10, 0),
            ((1 << 20) - (192 << 10), STATE_HOLE | STATE_ZERO)
        ]
    );
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 0, 1 << 20, &[]);
    assert_eq!(c.chunk().payload.len(), 12, "one descriptor");

    c.request(CMD_READ, CMD_FLAG_DF, 5, (128 << 10) - 1, 7, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.kind, ch.flags),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
    );
    assert_eq!(&ch.payload[0..8], &((128u64 << 10) - 1).to_be_bytes());
    assert_eq!(&ch.payload[8..], b"\0hello\0");
    c.request(CMD_READ, 0, 6, DISK_SIZE, 1, &[]);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.handle), (REPLY_TYPE_ERROR, 6));
    assert_eq!(&ch.payload[0..4], &EINVAL.to_be_bytes());
    c.request(CMD_READ, 0, 7, 0, 0, &[]);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags), (REPLY_TYPE_NONE, REPLY_FLAG_DONE));
    c.request(CMD_DISC, 0, 8, 0, 0, &[]);
    assert!(c.closed_by_server());
}

#[test]
fn block_status_needs_a_selected_context() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    c.structured();
    // Selected for another export: does not carry over to "disk".
    c.set_base_allocation("small");
    c.go("disk");
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096, &[]);
    let ch = c.chunk();
    assert_eq!(ch.kind, REPLY_TYPE_ERROR);
    assert_eq!(&ch.payload[0..4], &EINVAL.to_be_bytes());
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    let (_, flags) = c.go("ro");
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    c.request(CMD_WRITE, 0, 1, 0, 4, b"evil");
    assert_eq!(c.simple(0).0, EPERM);
    c.request(CMD_TRIM, 0, 2, 0, 4, &[]);
    assert_eq!(c.simple(0).0, EPERM);
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4, &[]);
    assert_eq!(c.simple(0).0, EPERM);
    c.request(CMD_READ, 0, 4, 0, 18, &[]);
    assert_eq!(c.simple(18).2, b"read-only contents");
}

#[test]
fn export_name_enters_transmission_or_closes() {
    let srv = TestServer::start();
    // Without NO_ZEROES: size, flags and 124 zero bytes.
    let mut c = Raw::connect(srv.addr);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"small");
    let mut b = [0u8; 8 + 2 + 124];
    std::io::Read::read_exact(&mut c.s, &mut b).expect("export info");
    assert_eq!(&b[0..8], &(1u64 << 20).to_be_bytes());
    assert!(b[10..].iter().all(|&x| x == 0));
    c.request(CMD_READ, 0, 1, 0, 4, &[]);
    assert_eq!(c.simple(4), (0, 1, vec![0; 4]));

    let mut c = Raw::start(srv.addr);
    c.option(OPT_EXPORT_NAME, b"missing");
    assert!(
        c.closed_by_server(),
        "no error reply exists for EXPORT_NAME"
    );
    let mut c = Raw::connect(srv.addr);
    c.send(&0x8000_0000u32.to_be_bytes());
    assert!(c.closed_by_server(), "unknown client flags");
}

#[test]
fn a_flush_on_one_connection_covers_writes_acknowledged_on_another() {
    let srv = TestServer::start();
    let mut a = Raw::start(srv.addr);
    let mut b = Raw::start(srv.addr);
    let (_, fa) = a.go("disk");
    b.go("disk");
    assert_ne!(fa & FLAG_CAN_MULTI_CONN, 0);
    let flushes = srv.disk.flushes();
    a.request(CMD_WRITE, 0, 1, 0, 3, b"one");
    assert_eq!(a.simple(0).0, 0);
    assert_eq!(srv.disk.unflushed(), 1);
    b.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
    assert_eq!(b.simple(0).0, 0);
    assert_eq!(srv.disk.unflushed(), 0);
    assert_eq!(srv.disk.flushes(), flushes + 1);
    b.request(CMD_READ, 0, 3, 0, 3, &[]);
    assert_eq!(b.simple(3).2, b"one", "shared state");
    assert_eq!(srv.catalog.connections("disk"), 2);
}

#[test]
fn pipelined_requests_are_all_answered_with_their_handles() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    c.go("disk");
    let n = 200u64;
    let mut batch = Vec::new();
    for h in 0..n {
        let req = Request {
            flags: 0,
            kind: CMD_WRITE,
            handle: 1000 + h,
            offset: h * 4096,
            len: 4096,
        };
        batch.extend_from_slice(&req.encode());
        batch.extend_from_slice(&[h as u8; 4096]);
    }
    c.send(&batch);
    let handles: BTreeSet<u64> = (0..n)
        .map(|_| {
            let (err, h, _) = c.simple(0);
            assert_eq!(err, 0);
            h
        })
        .collect();
    assert_eq!(handles, (1000..1000 + n).collect());
    for h in [0u64, 57, 199] {
        c.request(CMD_READ, 0, h, h * 4096, 4096, &[]);
        assert_eq!(c.simple(4096).2, vec![h as u8; 4096]);
    }
}

#[test]
fn oversized_options_are_skipped_or_the_client_dropped() {
    let srv = TestServer::start();
    let mut c = Raw::start(srv.addr);
    c.option(99, &vec![0u8; 100 << 10]);
    assert_eq!(c.opt_reply().kind, REP_ERR_TOO_BIG);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.opt_replies().last().map(|r| r.kind), Some(REP_ACK));
    // A claimed 1 GiB option is not worth reading.
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&m);
    assert!(c.closed_by_server());
}

/// A well-formed session: options, a write, a read, block status, flush, disconnect.
fn valid_transcript() -> Vec<u8> {
    let mut t = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let mut opt = |o: u32, d: &[u8]| {
        t.extend_from_slice(&IHAVEOPT.to_be_bytes());
        t.extend_from_slice(&o.to_be_bytes());
        t.extend_from_slice(&(d.len() as u32).to_be_bytes());
        t.extend_from_slice(d);
    };
    opt(OPT_LIST, &[]);
    opt(OPT_STRUCTURED_REPLY, &[]);
    let mut q = name("small");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&name(BASE_ALLOCATION));
    opt(OPT_SET_META_CONTEXT, &q);
    let mut g = name("small");
    g.extend_from_slice(&1u16.to_be_bytes());
    g.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    opt(OPT_GO, &g);
    let mut req = |kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]| {
        let r = Request {
            flags,
            kind,
            handle: 7,
            offset,
            len,
        };
        t.extend_from_slice(&r.encode());
        t.extend_from_slice(data);
    };
    req(CMD_WRITE, CMD_FLAG_FUA, 4096, 16, &[0xaa; 16]);
    req(CMD_READ, 0, 0, 8192, &[]);
    req(CMD_BLOCK_STATUS, 0, 0, 1 << 20, &[]);
    req(CMD_TRIM, 0, 0, 4096, &[]);
    req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 8192, 4096, &[]);
    req(CMD_FLUSH, 0, 0, 0, &[]);
    req(CMD_DISC, 0, 0, 0, &[]);
    t
}

/// Sends `input` on a fresh connection, closes our side, and checks that the server closes
/// its side too (reading everything it sends meanwhile): no hang, whatever the input.
fn feed(srv: &TestServer, input: &[u8]) -> bool {
    let mut c = Raw::connect(srv.addr);
    // The server may drop us before we finish writing; that is a fine outcome.
    let _ = c.s.write_all(input);
    let _ = c.s.shutdown(std::net::Shutdown::Write);
    c.closed_by_server()
}

#[test]
fn garbage_and_truncated_handshakes_leave_the_server_serving() {
    let srv = TestServer::start();
    let valid = valid_transcript();
    assert!(feed(&srv, &valid), "a valid session ends cleanly");
    // Truncated at every interesting point, pure noise, and HTTP.
    for cut in [
        0,
        1,
        3,
        4,
        10,
        19,
        20,
        30,
        60,
        valid.len() / 2,
        valid.len() - 1,
    ] {
        assert!(feed(&srv, &valid[..cut]), "truncated at {cut}");
    }
    assert!(feed(&srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    let seed: u64 = std::env::var("RAWFS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (set RAWFS_FUZZ_SEED to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..400 {
        let mut input = valid.clone();
        match rng.gen_range(0..4) {
            0 => {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..input.len());
                    input[at] ^= 1 << rng.gen_range(0..8);
                }
            }
            1 => {
                let at = rng.gen_range(0..input.len());
                let junk: Vec<u8> = (0..rng.gen_range(1..64)).map(|_| rng.gen()).collect();
                input.splice(at..at, junk);
            }
            2 => {
                let at = rng.gen_range(4..input.len());
                // A random 32-bit length somewhere after the client flags.
                let len: u32 = rng.gen();
                let end = (at + 4).min(input.len());
                input[at..end].copy_from_slice(&len.to_be_bytes()[..end - at]);
                input.truncate(rng.gen_range(at..=input.len()));
            }
            _ => input = (0..rng.gen_range(0..512)).map(|_| rng.gen()).collect(),
        }
        assert!(
            feed(&srv, &input),
            "iteration {i} (seed {seed}) did not end"
        );
    }
    // Still serving, and every connection has been cleaned up.
    let mut c = Raw::start(srv.addr);
    c.go("disk");
    c.request(CMD_READ, 0, 1, 0, 4, &[]);
    assert_eq!(c.simple(4).0, 0);
    drop(c);
    support::wait_for("all connections to end", Duration::from_secs(10), || {
        srv.connections() == 0
    });
    assert_eq!(srv.catalog.connections("small"), 0);
}
