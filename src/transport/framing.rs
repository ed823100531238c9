//! NDJSON framing over any byte stream: LF ends a line, a CR right before it is dropped, and a
//! line over the limit is discarded up to its newline without being kept in memory.
//!
//! Written by hand rather than with `BufRead::read_until` because an oversize line must be
//! skipped without buffering it, and because a whole batch of already-received lines has to
//! be visible at once (one flush per batch of responses).

use std::io::{self, Read};

/// One framed input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A line, without its line ending.
    Line(&'a [u8]),
    /// A line longer than the limit (its bytes were discarded).
    TooLarge,
}

/// Splits a byte stream into lines of at most `max_line_bytes`.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    discarding: bool,
    max_line_bytes: usize,
    eof: bool,
}

const CHUNK: usize = 64 * 1024;

impl<R: Read> LineReader<R> {
    /// A reader with the given line limit (line ending excluded).
    pub fn new(inner: R, max_line_bytes: usize) -> Self {
        LineReader {
            inner,
            buf: vec![0; CHUNK],
            start: 0,
            end: 0,
            discarding: false,
            max_line_bytes,
            eof: false,
        }
    }

    /// The next complete line already received, if any. After [`fill`](Self::fill) reports end
    /// of input, a last line without a newline is returned too.
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        if self.start == self.end {
            // An oversize last line without a newline is still answered.
            if self.eof && std::mem::take(&mut self.discarding) {
                return Some(Frame::TooLarge);
            }
            return None;
        }
        match memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
            Some(i) => {
                let (s, e) = (self.start, self.start + i);
                self.start = e + 1;
                if std::mem::take(&mut self.discarding) {
                    return Some(Frame::TooLarge);
                }
                Some(self.frame(s, e))
            }
            None if self.eof => {
                let (s, e) = (self.start, self.end);
                self.start = self.end;
                if std::mem::take(&mut self.discarding) {
                    return Some(Frame::TooLarge);
                }
                Some(self.frame(s, e))
            }
            None => {
                // A partial line: keep it unless it is already over the limit (+1 for a CR).
                if self.discarding || self.end - self.start > self.max_line_bytes + 1 {
                    self.discarding = true;
                    self.start = 0;
                    self.end = 0;
                }
                None
            }
        }
    }

    fn frame(&self, s: usize, mut e: usize) -> Frame<'_> {
        if e > s && self.buf[e - 1] == b'\r' {
            e -= 1;
        }
        if e - s > self.max_line_bytes {
            Frame::TooLarge
        } else {
            Frame::Line(&self.buf[s..e])
        }
    }

    /// Reads more input. Returns `Ok(false)` at end of input.
    pub fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.len() - self.end < CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < CHUNK {
            let new_len = self.buf.len() * 2;
            self.buf.resize(new_len, 0);
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize, chunk: usize) -> Vec<Result<String, ()>> {
        struct Chunked<'a>(&'a [u8], usize);
        impl Read for Chunked<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut r = LineReader::new(Chunked(input, chunk), max);
        let mut out = Vec::new();
        loop {
            while let Some(f) = r.next_frame() {
                out.push(match f {
                    Frame::Line(l) => Ok(String::from_utf8(l.to_vec()).unwrap()),
                    Frame::TooLarge => Err(()),
                });
            }
            if !r.fill().unwrap() {
                while let Some(f) = r.next_frame() {
                    out.push(match f {
                        Frame::Line(l) => Ok(String::from_utf8(l.to_vec()).unwrap()),
                        Frame::TooLarge => Err(()),
                    });
                }
                return out;
            }
        }
    }

    #[test]
    fn splits_lines_and_drops_cr_before_lf() {
        for chunk in [1, 3, 1000] {
            let f = frames(b"a\r\nb\rc\n\nlast", 100, chunk);
            assert_eq!(
                f,
                vec![
                    Ok("a".into()),
                    Ok("b\rc".into()),
                    Ok("".into()),
                    Ok("last".into())
                ]
            );
        }
    }

    #[test]
    fn an_oversize_last_line_without_newline_is_reported() {
        for chunk in [3, 1 << 20] {
            let mut input = b"ok\n".to_vec();
            input.extend(std::iter::repeat_n(b'x', 100_000));
            assert_eq!(frames(&input, 5, chunk), vec![Ok("ok".into()), Err(())]);
        }
    }

    #[test]
    fn discards_oversize_lines_and_keeps_going() {
        let mut input = b"ok\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 300_000));
        input.extend(b"\nafter\n12345\n123456\n");
        for chunk in [7, 4096, 1 << 20] {
            let f = frames(&input, 5, chunk);
            assert_eq!(
                f,
                vec![
                    Ok("ok".into()),
                    Err(()),
                    Ok("after".into()),
                    Ok("12345".into()),
                    Err(())
                ]
            );
        }
    }
}
