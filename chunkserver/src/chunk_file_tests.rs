//! Tests of [`super::ChunkFile`]: block checksums, partial writes, damage, direct and
//! unlocked writes, verification, zeroing.

/// The tests step in 64 KiB: byte offsets, whatever the checksum block.
const BLOCK_SIZE: u32 = 64 << 10;
const BS: u64 = BLOCK_SIZE as u64;
const DATA_OFFSET: u64 = Geometry::current().data_offset;

#[test]
fn a_patched_crc_equals_the_crc_of_the_patched_block() {
    let mut block: Vec<u8> = (0..BLOCK_SIZE as usize)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let mut crc = crc32c::crc32c(&block);
    for (at, len, fill) in [
        (0usize, 4096usize, 7u8),
        (4096, 1, 9),
        (61_440, 4096, 3),
        (100, 65_000, 1),
        (65_535, 1, 2),
    ] {
        let now = vec![fill; len];
        crc = patched_crc(crc, &block[at..at + len], &now, block.len() - at - len);
        block[at..at + len].copy_from_slice(&now);
        assert_eq!(crc, crc32c::crc32c(&block), "piece at {at}, {len} bytes");
    }
}

use super::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn table_entries_round_trip_and_detect_damage() {
    assert_eq!(Block::decode(&Block::Unwritten.encode()), Block::Unwritten);
    let e = Block::Written(0x1234_5678).encode();
    assert_eq!(Block::decode(&e), Block::Written(0x1234_5678));
    let mut damaged = e;
    damaged[1] ^= 0x40;
    assert_eq!(Block::decode(&damaged), Block::Bad);
}

/// Both geometries: the current 4 KiB checksum blocks and files made with 64 KiB ones.
fn geometries() -> [Geometry; 2] {
    [
        Geometry::current(),
        Geometry::of(rawfs_chunkserver_api::layout::LEGACY_CSUM_BLOCK).unwrap(),
    ]
}

#[test]
fn partial_writes_holes_and_reopen() {
    for geo in geometries() {
        partial_writes_holes_and_reopen_in(geo);
    }
}

fn partial_writes_holes_and_reopen_in(geo: Geometry) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut cf = ChunkFile::create_in(&path, 9, 1, geo).unwrap();
    let a = pattern(100, 1);
    cf.write(10, &a).unwrap();
    // A write spanning a partial head, two whole blocks and a partial tail.
    let b = pattern(3 * BLOCK_SIZE as usize, 2);
    cf.write(BS * 5 + 1000, &b).unwrap();
    // A partial overwrite of an already written block (read-modify-write).
    let c = pattern(50, 3);
    cf.write(BS * 5 + 1020, &c).unwrap();

    let check = |cf: &ChunkFile| {
        let got = cf.read(0, 200).unwrap();
        assert!(got[..10].iter().all(|&x| x == 0));
        assert_eq!(&got[10..110], &a[..]);
        assert!(got[110..].iter().all(|&x| x == 0));
        // A hole between the writes reads as zeros.
        assert!(cf.read(BS, 2 * BS).unwrap().iter().all(|&x| x == 0));
        let got = cf.read(BS * 5 + 1000, b.len() as u64).unwrap();
        assert_eq!(&got[..20], &b[..20]);
        assert_eq!(&got[20..70], &c[..]);
        assert_eq!(&got[70..], &b[70..]);
        // Past everything written, up to the chunk's end.
        let tail = cf.read(MAX_CHUNK_SIZE - 10, 10).unwrap();
        assert_eq!(&tail[..], &[0u8; 10]);
    };
    check(&cf);
    assert_eq!(cf.version(), 1);
    drop(cf);
    let cf = ChunkFile::open(&path).unwrap();
    assert_eq!((cf.id(), cf.version(), cf.block_size()), (9, 1, geo.block));
    check(&cf);
}

/// Long runs of whole blocks go to the disk direct (see `direct.rs`); what is read
/// after them, cached before them, or written around them in the same call is right.
#[test]
fn long_runs_are_written_direct_and_read_back_with_their_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut cf = ChunkFile::create(&path, 4, 1).unwrap();
    let (before, _) = crate::direct::written();
    // A partial head, 2.5 MiB of whole blocks (more than one staging buffer), a tail.
    let a = pattern((5 << 19) + 5000, 1);
    cf.write(3000, &a).unwrap();
    assert_eq!(&cf.read(3000, a.len() as u64).unwrap()[..], &a[..]);
    // Overwrite cached data direct: the cache must not keep the old bytes.
    let b = pattern(1 << 20, 2);
    cf.write(1 << 20, &b).unwrap();
    let check = |cf: &ChunkFile| {
        let got = cf.read(0, 3000 + a.len() as u64).unwrap();
        assert!(got[..3000].iter().all(|&x| x == 0));
        assert_eq!(&got[3000..1 << 20], &a[..(1 << 20) - 3000]);
        assert_eq!(&got[1 << 20..2 << 20], &b[..]);
        assert_eq!(&got[2 << 20..], &a[(2 << 20) - 3000..]);
    };
    check(&cf);
    // From a page-aligned buffer (as the data port reads write payloads): no staging.
    let c = pattern(1 << 20, 3);
    let mut aligned = rawfs_chunkserver_api::aligned::AlignedPayload::new(c.len(), 0).unwrap();
    bytes::BufMut::put_slice(&mut aligned, &c);
    let aligned = Bytes::from_owner(aligned);
    assert_eq!(aligned.as_ptr() as usize % 4096, 0);
    cf.write(4 << 20, &aligned).unwrap();
    assert_eq!(&cf.read(4 << 20, c.len() as u64).unwrap()[..], &c[..]);
    cf.sync().unwrap();
    drop(cf);
    check(&ChunkFile::open(&path).unwrap());
    let reopened = ChunkFile::open(&path).unwrap();
    assert_eq!(&reopened.read(4 << 20, c.len() as u64).unwrap()[..], &c[..]);
    let (after, refused) = crate::direct::written();
    assert!(
        refused || after - before >= (4 << 20),
        "{} bytes went direct",
        after - before
    );
}

#[test]
fn a_write_returns_the_bytes_of_blocks_it_filled_for_the_first_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut cf = ChunkFile::create(&dir.path().join("c"), 1, 1).unwrap();
    let block = cf.geo.block;
    assert_eq!(cf.write(10, b"abc").unwrap(), block, "one new block");
    assert_eq!(cf.write(100, b"def").unwrap(), 0, "the same block again");
    // Straddling the written block and two new ones, in pieces and whole.
    let long = pattern(2 * block as usize, 1);
    assert_eq!(cf.write(block - 5, &long).unwrap(), 2 * block);
    // A long run of whole blocks (the direct path), half of it over written blocks.
    let run = pattern(64 * block as usize, 2);
    assert_eq!(cf.write(2 * block, &run).unwrap(), 63 * block);
    // Zeroed blocks are holes again: writing them counts once more.
    cf.zero(4 * block, 2 * block).unwrap();
    assert_eq!(cf.write(4 * block, &long).unwrap(), 2 * block);
    assert_eq!(cf.write(MAX_CHUNK_SIZE - 1, b"z").unwrap(), block);
}

#[test]
fn holes_take_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut cf = ChunkFile::create(&path, 1, 1).unwrap();
    cf.write(MAX_CHUNK_SIZE - BS, &pattern(BLOCK_SIZE as usize, 0))
        .unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, DATA_OFFSET + MAX_CHUNK_SIZE);
    // Header page, a table page and one block, give or take filesystem rounding.
    assert!(
        cf.allocated().unwrap() < 1 << 20,
        "{}",
        cf.allocated().unwrap()
    );
}

#[test]
fn corruption_on_disk_is_detected() {
    for geo in geometries() {
        corruption_on_disk_is_detected_in(geo);
    }
}

fn corruption_on_disk_is_detected_in(geo: Geometry) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut cf = ChunkFile::create_in(&path, 1, 1, geo).unwrap();
    cf.write(0, &pattern(4 * BLOCK_SIZE as usize, 7)).unwrap();
    drop(cf);
    // Flip one byte inside block 2.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff], geo.data_offset + 2 * BS + 77)
        .unwrap();
    drop(f);
    let mut cf = ChunkFile::open(&path).unwrap();
    assert!(cf.read(0, 2 * BS).is_ok());
    assert_eq!(
        cf.read(BS, 2 * BS).unwrap_err(),
        StoreError::Corrupt { offset: 2 * BS }
    );
    // A partial write into the bad block does not launder the damage: its new crc
    // is patched from the old one, so the block still fails...
    cf.write(2 * BS + 5, b"xy").unwrap();
    assert_eq!(
        cf.read(2 * BS, 10).unwrap_err(),
        StoreError::Corrupt { offset: 2 * BS }
    );
    // ...but a whole-block overwrite replaces it.
    cf.write(2 * BS, &pattern(BLOCK_SIZE as usize, 8)).unwrap();
    assert!(cf.read(0, 4 * BS).is_ok());
}

#[test]
fn verify_walks_written_blocks_in_pieces_and_stops_at_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut cf = ChunkFile::create(&path, 1, 1).unwrap();
    // Blocks 0..3 and 10..12 hold data; the rest are holes.
    cf.write(0, &pattern(3 * BLOCK_SIZE as usize, 1)).unwrap();
    cf.write(10 * BS, &pattern(2 * BLOCK_SIZE as usize, 2))
        .unwrap();
    let v = cf.verify(0, 2 * BS).unwrap();
    assert_eq!(
        v,
        Verified {
            bytes: 2 * BS,
            next: Some(2 * BS)
        }
    );
    let v = cf.verify(2 * BS, 2 * BS).unwrap();
    assert_eq!(
        v,
        Verified {
            bytes: 2 * BS,
            next: Some(11 * BS)
        }
    );
    let v = cf.verify(11 * BS, 2 * BS).unwrap();
    assert_eq!(
        v,
        Verified {
            bytes: BS,
            next: None
        }
    );
    // An empty chunk has nothing to check.
    let empty = ChunkFile::create(&dir.path().join("e"), 2, 1).unwrap();
    assert_eq!(
        empty.verify(0, BS).unwrap(),
        Verified {
            bytes: 0,
            next: None
        }
    );
    drop(cf);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x5a], DATA_OFFSET + 11 * BS + 9).unwrap();
    drop(f);
    let cf = ChunkFile::open(&path).unwrap();
    assert!(cf.verify(0, 3 * BS).is_ok());
    assert_eq!(
        cf.verify(0, 64 * BS).unwrap_err(),
        StoreError::Corrupt { offset: 11 * BS }
    );
}

#[test]
fn damaged_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    ChunkFile::create(&path, 1, 1).unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xee], 20).unwrap();
    assert!(matches!(
        ChunkFile::open(&path),
        Err(OpenError::BadHeader { complete: true, .. })
    ));
    std::fs::write(&path, b"RAW").unwrap();
    assert!(matches!(
        ChunkFile::open(&path),
        Err(OpenError::BadHeader {
            complete: false,
            ..
        })
    ));
}

#[test]
fn out_of_range_is_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut cf = ChunkFile::create(&dir.path().join("c"), 1, 1).unwrap();
    assert!(matches!(
        cf.write(MAX_CHUNK_SIZE - 1, b"ab"),
        Err(StoreError::BadRequest { .. })
    ));
    assert!(matches!(
        cf.read(u64::MAX, 2),
        Err(StoreError::BadRequest { .. })
    ));
}

#[test]
fn zeroing_frees_whole_blocks_and_zeroes_the_edges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut cf = ChunkFile::create(&path, 1, 1).unwrap();
    let data = pattern(16 * BLOCK_SIZE as usize, 3);
    cf.write(0, &data).unwrap();
    let full = cf.allocated().unwrap();
    let bs = cf.block_size();
    // From the middle of a block to the middle of another, many blocks apart.
    let (from, to) = (BS + 100, 12 * BS + 7);
    cf.zero(from, to - from).unwrap();
    let mut want = data.clone();
    want[from as usize..to as usize].fill(0);
    assert_eq!(cf.read(0, 16 * BS).unwrap(), want);
    // The whole blocks inside are unwritten (their space given back); the edges hold data.
    let first_whole = from.div_ceil(bs);
    let whole_end = to / bs;
    let runs = cf.written(0, 16 * BS).unwrap();
    let u = |x: u64| x as u32;
    assert_eq!(
        runs,
        vec![0..u(first_whole * bs), u(whole_end * bs)..u(16 * BS)]
    );
    assert!(
        cf.allocated().unwrap() + (whole_end - first_whole) * bs <= full + 4096,
        "{} of {full} bytes still taken",
        cf.allocated().unwrap()
    );
    // The same after opening the file again (the table on disk says so too).
    drop(cf);
    let mut cf = ChunkFile::open(&path).unwrap();
    assert_eq!(cf.read(0, 16 * BS).unwrap(), want);
    assert_eq!(cf.written(0, 16 * BS).unwrap(), runs);
    // A write into the hole's middle lands whole, with zeros around it.
    cf.write(5 * BS + 3, b"back").unwrap();
    want[(5 * BS + 3) as usize..(5 * BS + 7) as usize].copy_from_slice(b"back");
    assert_eq!(cf.read(0, 16 * BS).unwrap(), want);
    // Zeroing unwritten space, or a piece of one unwritten block, writes nothing.
    cf.zero(20 * BS, 3 * BS).unwrap();
    cf.zero(30 * BS + 1, 10).unwrap();
    assert!(cf.written(20 * BS, 20 * BS).unwrap().is_empty());
    assert!(cf.zero(MAX_CHUNK_SIZE, 1).is_err(), "past the chunk");
}
