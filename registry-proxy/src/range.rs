//! The `Range` request header, as containerd sends it when it resumes a blob (`bytes=N-`).
//!
//! Parsing and bounds checks are `http-range-header`'s; this module narrows its answer to the
//! one thing shoal serves: a single range within the blob.

use std::ops::RangeInclusive;

/// One satisfiable byte range of a blob, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end_inclusive: u64,
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Syntax shoal does not understand; the spec says to ignore such a header and send 200.
    #[error("malformed Range header")]
    Malformed,
    /// More than one range: shoal does not produce multipart bodies.
    #[error("multiple ranges are not supported")]
    Multiple,
    /// Well-formed, but outside the blob: answer 416.
    #[error("range not satisfiable for a blob of {len} bytes")]
    Unsatisfiable { len: u64 },
}

impl ByteRange {
    /// Parses `header` for a blob of `len` bytes.
    pub fn parse(header: &str, len: u64) -> Result<Self, RangeError> {
        let parsed =
            http_range_header::parse_range_header(header).map_err(|_| RangeError::Malformed)?;
        let ranges: Vec<RangeInclusive<u64>> = parsed
            .validate(len)
            .map_err(|_| RangeError::Unsatisfiable { len })?;
        match ranges.as_slice() {
            // The crate lets `bytes=0-` through for an empty blob; no range of it exists.
            [one] if *one.end() >= len => Err(RangeError::Unsatisfiable { len }),
            [one] => Ok(Self {
                start: *one.start(),
                end_inclusive: *one.end(),
            }),
            _ => Err(RangeError::Multiple),
        }
    }

    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end_inclusive - self.start + 1
    }

    /// Never true: a satisfiable range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` value of a 206 answer for a blob of `total` bytes.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end_inclusive, total)
    }
}

/// The `Content-Range` value of a 416 answer.
pub fn unsatisfied_content_range(total: u64) -> String {
    format!("bytes */{total}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end_inclusive: u64) -> ByteRange {
        ByteRange {
            start,
            end_inclusive,
        }
    }

    #[test]
    fn accepts_the_forms_clients_send() {
        assert_eq!(ByteRange::parse("bytes=0-", 10), Ok(r(0, 9)));
        assert_eq!(ByteRange::parse("bytes=5-", 10), Ok(r(5, 9)));
        assert_eq!(ByteRange::parse("bytes=2-4", 10), Ok(r(2, 4)));
        assert_eq!(ByteRange::parse("bytes=-3", 10), Ok(r(7, 9)));
        assert_eq!(ByteRange::parse("bytes=2-400", 10), Ok(r(2, 9)));
        assert_eq!(r(2, 4).len(), 3);
        assert_eq!(r(2, 4).content_range(10), "bytes 2-4/10");
    }

    #[test]
    fn rejects_what_cannot_be_served() {
        assert_eq!(
            ByteRange::parse("bytes=10-", 10),
            Err(RangeError::Unsatisfiable { len: 10 })
        );
        assert_eq!(
            ByteRange::parse("bytes=0-", 0),
            Err(RangeError::Unsatisfiable { len: 0 })
        );
        assert_eq!(
            ByteRange::parse("bytes=5-2", 10),
            Err(RangeError::Unsatisfiable { len: 10 })
        );
        assert_eq!(
            ByteRange::parse("bytes=0-1,3-4", 10),
            Err(RangeError::Multiple)
        );
        assert_eq!(
            ByteRange::parse("items=0-1", 10),
            Err(RangeError::Malformed)
        );
        assert_eq!(
            ByteRange::parse("bytes=abc", 10),
            Err(RangeError::Malformed)
        );
        assert_eq!(ByteRange::parse("", 10), Err(RangeError::Malformed));
        // Numbers that do not fit in u64 must not wrap around.
        assert_eq!(
            ByteRange::parse("bytes=99999999999999999999999-", 10),
            Err(RangeError::Malformed)
        );
        assert_eq!(
            ByteRange::parse("bytes=0-99999999999999999999999", 10),
            Err(RangeError::Malformed)
        );
    }
}
