//! `SEEK_DATA`/`SEEK_HOLE` against the in-memory cluster ([`crate::fake`], whose servers
//! track written data in 64 KiB pages).

use crate::fake::Fake;
use crate::FileIo;
use rawfs_metadata_api::CHUNK_SIZE;
use std::sync::Arc;

const INO: u64 = 43;
const PAGE: u64 = 64 << 10;

fn setup() -> (Arc<Fake>, FileIo) {
    let fake = Arc::new(Fake::new(3));
    let io = FileIo::new(INO, 0, fake.clone(), 1 << 20);
    (fake, io)
}

#[tokio::test]
async fn seeks_find_written_blocks_inside_chunks_and_holes_between_them() {
    let (_fake, io) = setup();
    io.write(0, b"head").await.unwrap();
    let far = 3 * CHUNK_SIZE + 200 * 1024;
    io.write(far, &[7u8; 4096]).await.unwrap();
    io.set_size(5 * CHUNK_SIZE);
    io.flush().await.unwrap();

    assert_eq!(io.seek_data(0).await.unwrap(), Some(0));
    assert_eq!(io.seek_data(3).await.unwrap(), Some(3));
    assert_eq!(io.seek_hole(0).await.unwrap(), Some(PAGE));
    // Past the first page: the next data is the page holding `far`, three chunks on.
    let far_page = far / PAGE * PAGE;
    assert_eq!(io.seek_data(PAGE).await.unwrap(), Some(far_page));
    assert_eq!(io.seek_hole(far_page).await.unwrap(), Some(far_page + PAGE));
    assert_eq!(io.seek_hole(far).await.unwrap(), Some(far_page + PAGE));
    // Nothing after it but the hole up to the end of the file.
    assert_eq!(io.seek_data(far_page + PAGE).await.unwrap(), None);
    assert_eq!(
        io.seek_hole(4 * CHUNK_SIZE).await.unwrap(),
        Some(4 * CHUNK_SIZE)
    );
    // At or past the end: ENXIO for both.
    assert_eq!(io.seek_data(5 * CHUNK_SIZE).await.unwrap(), None);
    assert_eq!(io.seek_hole(5 * CHUNK_SIZE).await.unwrap(), None);
    assert_eq!(io.seek_hole(u64::MAX).await.unwrap(), None);
}

#[tokio::test]
async fn buffered_writes_count_as_data() {
    let (fake, io) = setup();
    io.set_size(4 * CHUNK_SIZE);
    io.write(2 * CHUNK_SIZE + 5, b"buffered").await.unwrap();
    assert_eq!(fake.st().writes, 0, "still in the buffer");
    assert_eq!(io.seek_data(0).await.unwrap(), Some(2 * CHUNK_SIZE));
}

#[tokio::test]
async fn a_chunk_no_replica_can_describe_is_all_data() {
    let (fake, io) = setup();
    io.write(CHUNK_SIZE + 10, b"x").await.unwrap();
    io.set_size(3 * CHUNK_SIZE);
    io.flush().await.unwrap();
    let loc = fake.st().map.get(&(INO, 1)).cloned().unwrap();
    for r in &loc.replicas {
        fake.st().down.insert(r.server);
    }
    // Unknown is not a hole: a sparse copy must not skip what it cannot see.
    assert_eq!(io.seek_data(0).await.unwrap(), Some(CHUNK_SIZE));
    assert_eq!(
        io.seek_hole(CHUNK_SIZE).await.unwrap(),
        Some(2 * CHUNK_SIZE)
    );
    // One replica answering is enough.
    fake.st().down.remove(&loc.replicas[2].server);
    assert_eq!(
        io.seek_hole(CHUNK_SIZE).await.unwrap(),
        Some(CHUNK_SIZE + PAGE)
    );
}

#[tokio::test]
async fn scans_step_over_many_chunks() {
    let (_fake, io) = setup();
    for i in 0..40u64 {
        io.write(i * CHUNK_SIZE + 3 * PAGE, b"x").await.unwrap();
    }
    io.flush().await.unwrap();
    let mut pos = 0;
    let mut found = Vec::new();
    while let Some(d) = io.seek_data(pos).await.unwrap() {
        found.push(d);
        pos = io.seek_hole(d).await.unwrap().unwrap();
        // The last one ends with the file.
        assert_eq!(pos, (d + PAGE).min(io.size()));
    }
    let want: Vec<u64> = (0..40).map(|i| i * CHUNK_SIZE + 3 * PAGE).collect();
    assert_eq!(found, want);
    assert_eq!(pos, io.size());
}

#[tokio::test]
async fn a_chunk_known_here_counts_though_the_metadata_answer_lacks_it() {
    let (fake, io) = setup();
    io.write(2 * CHUNK_SIZE + 7, b"fresh").await.unwrap();
    io.flush().await.unwrap();
    // A lagging metadata replica (consistency=local) that has not heard of the chunk yet.
    let loc = fake.st().map.remove(&(INO, 2)).unwrap();
    assert_eq!(io.seek_data(0).await.unwrap(), Some(2 * CHUNK_SIZE));
    fake.st().map.insert((INO, 2), loc);
}

#[tokio::test]
async fn a_seek_across_terabytes_of_hole_takes_few_lookups() {
    let (fake, io) = setup();
    let far = 100u64 << 40;
    io.write(far, b"end").await.unwrap();
    io.flush().await.unwrap();
    let writes = fake.st().writes;
    let lookups = fake.st().lookups;
    assert_eq!(io.seek_data(0).await.unwrap(), Some(far));
    // 1.6 million chunk indexes of hole: windows that grow, not 6,400 of 16 GiB.
    let used = fake.st().lookups - lookups;
    assert!(used < 200, "{used} lookups");
    assert_eq!(io.seek_hole(0).await.unwrap(), Some(0));
    assert_eq!(io.seek_hole(far).await.unwrap(), Some(far + 3));
    assert_eq!(fake.st().writes, writes, "seeks write nothing");
}
