//! `kill -9` in the middle of appends: every acknowledged entry must survive, intact.
//!
//! The parent test re-runs this test binary with [`CHILD_DIR_ENV`] set, which turns
//! [`crash_child`] into an endless appender that prints `ACK <last index>` after each append
//! returns. The parent SIGKILLs it after a random number of acknowledgements (so at a random
//! point of a write, a segment roll or an fsync), reopens the log and checks it; several
//! rounds run on the same directory, each child resuming after the previous one's log.

use std::hash::BuildHasher;
use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use openraft::EntryPayload;

use super::tests::entry;
use super::tests::payload_for;
use super::*;

const CHILD_DIR_ENV: &str = "RAWFS_TEST_LOG_CRASH_CHILD_DIR";
const ROUNDS: usize = 4;

fn opts() -> Options {
    Options {
        segment_bytes: 32 << 10,
        cache_entries: 64,
        cache_bytes: 1 << 20,
        sync_delay: super::SYNC_DELAY,
    }
}

/// A random number in `0..n` (std only: the hasher keys are random per process).
fn random_below(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) % n
}

/// The child: appends batches of 1 to 13 entries until killed (or for 60 s at most, so a
/// parent that died cannot leave it running forever).
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let store = LogStore::open_with(Path::new(&dir), opts()).expect("child: open");
    let mut next = store.shared.lock().last_index().map_or(0, |l| l + 1);
    let mut out = std::io::stdout().lock();
    let stop = Instant::now() + Duration::from_secs(60);
    let mut size = 1 + random_below(13);
    while Instant::now() < stop {
        let batch = (next..next + size).map(|i| entry(1, i)).collect();
        store.append_batch(batch).expect("child: append");
        next += size;
        writeln!(out, "ACK {}", next - 1)
            .and_then(|()| out.flush())
            .expect("child: report");
        size = size % 13 + 1;
    }
}

/// Reads `ACK n` lines, returning the greatest `n`, until `stop_after` of them or the end.
fn read_acks(reader: &mut impl BufRead, stop_after: Option<u64>, acked: &mut Option<u64>) {
    let mut seen = 0;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(n) = line.trim().strip_prefix("ACK ") {
            let n: u64 = n.parse().expect("ack line");
            assert!(acked.map_or(true, |a| n > a), "acks go up");
            *acked = Some(n);
            seen += 1;
            if stop_after.is_some_and(|s| seen >= s) {
                return;
            }
        }
    }
}

#[tokio::test]
async fn kill_9_keeps_every_acknowledged_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: Option<u64> = None;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "log_store::crash_tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let mut reader = BufReader::new(child.stdout.take().expect("child stdout"));
        let before = acked;
        read_acks(&mut reader, Some(100 + random_below(3000)), &mut acked);
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("reap the child");
        // Acks already in the pipe were acknowledged before the kill too.
        read_acks(&mut reader, None, &mut acked);
        assert!(
            acked > before,
            "round {round}: the child made progress ({status})"
        );

        let store = LogStore::open_with(dir.path(), opts()).expect("reopen after kill -9");
        let last = store.shared.lock().last_index();
        assert!(
            last >= acked,
            "round {round}: log ends at {last:?}, {acked:?} was acknowledged"
        );
        let mut reader = store.clone();
        let all = reader.try_get_log_entries(..).await.expect("read back");
        assert_eq!(all.len() as u64, last.map_or(0, |l| l + 1), "no gap");
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.log_id, log_id(1, i as u64));
            assert_eq!(
                e.payload,
                EntryPayload::Normal(crate::Command(payload_for(i as u64)))
            );
        }
        println!(
            "kill -9 round {round}: acknowledged up to {acked:?}, log ends at {last:?}, intact"
        );
    }
}
