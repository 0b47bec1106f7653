//! Framing: a 4-byte big-endian length, then a postcard-encoded message.
//!
//! The decoder is sans-IO: feed it bytes as they arrive, take whole messages out. A length
//! over the limit is an error as soon as the 4 length bytes are in, before anything is
//! buffered, so a hostile peer cannot make a node allocate more than the limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest control frame: a task for a 64 GiB blob (65,536 hashes of 32 bytes) fits.
pub const MAX_FRAME: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame over the limit: it is broken or hostile.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLong { len: u32, max: u32 },
    /// The frame's bytes are not a message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Bytes before each frame's body: its length.
pub const HEADER_LEN: usize = 4;

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    let body = postcard::to_allocvec(msg).expect("shoal messages always serialize");
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out.freeze()
}

/// Collects bytes and yields whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME)
    }
}

impl FrameDecoder {
    pub fn new(max: u32) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one is in.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes"));
        if len > self.max {
            return Err(FrameError::TooLong { len, max: self.max });
        }
        if self.buf.len() < 4 + len as usize {
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(len as usize);
        Ok(Some(postcard::from_bytes(&body)?))
    }

    /// Bytes received but not yet part of a whole message (for end-of-stream checks).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Bytes after the last decoded frame, e.g. the start of a piece's raw bytes.
    pub fn take_rest(&mut self) -> BytesMut {
        self.buf.split()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{PeerReply, PeerRequest, ToSupernode};
    use crate::{BlobDigest, PieceIndex};
    use proptest::prelude::*;

    #[test]
    fn round_trips_across_any_split() {
        let msgs = vec![
            PeerRequest::Piece {
                digest: BlobDigest::of(b"a"),
                index: PieceIndex(3),
                hashes: false,
            },
            PeerRequest::Piece {
                digest: BlobDigest::of(b"b"),
                index: PieceIndex(u32::MAX),
                hashes: true,
            },
        ];
        let wire: Vec<u8> = msgs.iter().flat_map(|m| encode(m).to_vec()).collect();
        for split in 0..wire.len() {
            let mut d = FrameDecoder::default();
            d.push(&wire[..split]);
            let mut got = Vec::new();
            while let Some(m) = d.decode::<PeerRequest>().unwrap() {
                got.push(m);
            }
            d.push(&wire[split..]);
            while let Some(m) = d.decode::<PeerRequest>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, msgs);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn refuses_oversized_frames_before_buffering_them() {
        let mut d = FrameDecoder::new(1024);
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            d.decode::<PeerReply>(),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.decode::<ToSupernode>(),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        // Fuzzing by property: no input makes a decoder panic or allocate past its limit.
        #[test]
        fn decoders_survive_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = FrameDecoder::new(4096);
            d.push(&bytes);
            let _ = d.decode::<ToSupernode>();
            let mut d = FrameDecoder::new(4096);
            d.push(&bytes);
            let _ = d.decode::<crate::message::FromSupernode>();
            let mut d = FrameDecoder::new(4096);
            d.push(&bytes);
            let _ = d.decode::<PeerReply>();
        }

        #[test]
        fn arbitrary_frames_with_valid_length(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut wire = (body.len() as u32).to_be_bytes().to_vec();
            wire.extend(&body);
            let mut d = FrameDecoder::default();
            d.push(&wire);
            if let Ok(Some(m)) = d.decode::<crate::message::FromSupernode>() {
                let _ = m.validate();
            }
        }
    }
}
