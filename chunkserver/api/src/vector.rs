//! WRITEV payloads: several pieces of one chunk in one request.
//!
//! A flush of scattered small writes (a database page here, a log record there) touches
//! many places of few chunks. One WRITE per piece would cost a round trip and a task
//! hand-off per 4 KiB on every replica; a WRITEV carries up to [`MAX_PIECES`] of them in
//! one frame. The pieces are applied in order, each like a WRITE of its own, so a WRITEV
//! is idempotent like the WRITEs it stands for.
//!
//! ```text
//!  off        size  field
//!    0           4  count                     1..=MAX_PIECES
//!    4     8*count  (offset u32, length u32)  per piece, big-endian; each inside the chunk
//!    4+8*count   …  the pieces' bytes, in order, back to back (sum of the lengths)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::MAX_CHUNK_SIZE;

/// Most pieces one WRITEV carries.
pub const MAX_PIECES: usize = 4096;

/// One piece of a WRITEV: bytes to store at `offset` of the chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u32,
    pub data: Bytes,
}

/// Why a WRITEV payload was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorError {
    Count,
    Truncated,
    Trailing,
    OutOfRange,
}

impl VectorError {
    /// The refusal as a fixed message (sent back in a BAD_REQUEST response).
    pub fn reason(self) -> &'static str {
        match self {
            VectorError::Count => "a writev carries 1 to 4096 pieces",
            VectorError::Truncated => "writev payload shorter than its piece table says",
            VectorError::Trailing => "writev payload has bytes past its last piece",
            VectorError::OutOfRange => "writev piece ends past the end of the chunk",
        }
    }
}

impl std::fmt::Display for VectorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for VectorError {}

/// The payload's size for `pieces`.
pub fn encoded_len(pieces: &[Piece]) -> usize {
    4 + 8 * pieces.len() + pieces.iter().map(|p| p.data.len()).sum::<usize>()
}

/// Lays `pieces` out as a WRITEV payload (one copy of the data).
pub fn encode(pieces: &[Piece]) -> Bytes {
    let mut out = BytesMut::with_capacity(encoded_len(pieces));
    out.put_u32(pieces.len() as u32);
    for p in pieces {
        out.put_u32(p.offset);
        out.put_u32(p.data.len() as u32);
    }
    for p in pieces {
        out.put_slice(&p.data);
    }
    out.freeze()
}

/// Splits a WRITEV payload into its pieces (slices of `payload`, no copy), checking the
/// count, that the lengths add up to the payload exactly, and that every piece lies inside
/// a chunk.
pub fn decode(payload: &Bytes) -> Result<Vec<Piece>, VectorError> {
    let word = |at: usize| -> Result<u32, VectorError> {
        let b = payload.get(at..at + 4).ok_or(VectorError::Truncated)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let count = word(0)? as usize;
    if count == 0 || count > MAX_PIECES {
        return Err(VectorError::Count);
    }
    let mut at = 4 + 8 * count;
    if payload.len() < at {
        return Err(VectorError::Truncated);
    }
    let mut pieces = Vec::with_capacity(count);
    for i in 0..count {
        let offset = word(4 + 8 * i)?;
        let len = word(8 + 8 * i)? as usize;
        if u64::from(offset) + len as u64 > MAX_CHUNK_SIZE {
            return Err(VectorError::OutOfRange);
        }
        let end = at.checked_add(len).ok_or(VectorError::Truncated)?;
        if end > payload.len() {
            return Err(VectorError::Truncated);
        }
        pieces.push(Piece {
            offset,
            data: payload.slice(at..end),
        });
        at = end;
    }
    if at != payload.len() {
        return Err(VectorError::Trailing);
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offset: u32, fill: u8, len: usize) -> Piece {
        Piece {
            offset,
            data: Bytes::from(vec![fill; len]),
        }
    }

    #[test]
    fn pieces_round_trip() {
        let pieces = vec![piece(0, 1, 4096), piece(1 << 20, 2, 10), piece(77, 3, 0)];
        let payload = encode(&pieces);
        assert_eq!(payload.len(), encoded_len(&pieces));
        assert_eq!(decode(&payload).unwrap(), pieces);
    }

    #[test]
    fn malformed_payloads_are_refused() {
        assert_eq!(decode(&Bytes::new()), Err(VectorError::Truncated));
        assert_eq!(
            decode(&Bytes::from_static(&[0, 0, 0, 0])),
            Err(VectorError::Count)
        );
        let good = encode(&[piece(8, 9, 100)]);
        assert_eq!(
            decode(&good.slice(..good.len() - 1)),
            Err(VectorError::Truncated)
        );
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(decode(&Bytes::from(long)), Err(VectorError::Trailing));
        let past_end = encode(&[piece((MAX_CHUNK_SIZE - 10) as u32, 1, 11)]);
        assert_eq!(decode(&past_end), Err(VectorError::OutOfRange));
        // A count that promises more table than there is payload.
        let mut lying = vec![0, 0, 0x10, 0];
        lying.extend_from_slice(&[0; 16]);
        assert_eq!(decode(&Bytes::from(lying)), Err(VectorError::Truncated));
        assert!(VectorError::Count
            .reason()
            .contains(&MAX_PIECES.to_string()));
    }
}
