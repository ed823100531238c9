//! A claimant, written as another process (in any language) would write one against the
//! contract's section 8.3: connect to the claim socket, send the line, receive the answer and
//! its descriptors with `recvmsg` (SCM_RIGHTS, up to 250 per message, so read until the
//! newline and then the end), and map the segments back to back.

use serde_json::{Value, json};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// What a claim brought back.
pub struct Claim {
    /// The answer's line, parsed.
    pub line: Value,
    /// The descriptors received, in order.
    pub fds: Vec<OwnedFd>,
}

impl Claim {
    /// The error code of a refusal (`None` for an answer with segments).
    pub fn error_code(&self) -> Option<&str> {
        self.line["error_code"].as_str()
    }
}

/// Connects to the claim socket at `socket`.
pub fn connect(socket: &str) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Sends `bytes` as they are and reads the answer.
pub fn claim_raw(socket: &str, bytes: &[u8]) -> Claim {
    let stream = connect(socket);
    // The server may answer (and close) before it read everything of a long line.
    let _ = (&stream).write_all(bytes);
    receive(&stream)
}

/// Claims `export_id` with `secret`.
pub fn claim(socket: &str, export_id: &str, secret: &str) -> Claim {
    let line = format!("{}\n", json!({"export_id": export_id, "secret": secret}));
    claim_raw(socket, line.as_bytes())
}

/// Claims the export `info` (a `memory.export` answer) with its own secret.
pub fn claim_export(info: &memcoord::protocol::ExportInfo) -> Claim {
    claim(&info.socket_path, &info.export_id, &info.secret)
}

/// One `recvmsg`: bytes into `buf`, descriptors appended to `fds`; returns the bytes read.
fn recv_once(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    // Room for more descriptors than one message carries (250), so none is ever cut off.
    let space = unsafe { libc::CMSG_SPACE((256 * size_of::<libc::c_int>()) as u32) as usize };
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one; it points at `iov` and `control` below,
    // both alive across the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    assert_eq!(
        msg.msg_flags & libc::MSG_CTRUNC,
        0,
        "descriptors were cut off"
    );
    // SAFETY: walking the control messages the kernel wrote, within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            assert_eq!((*c).cmsg_level, libc::SOL_SOCKET);
            assert_eq!((*c).cmsg_type, libc::SCM_RIGHTS);
            let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
            let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for k in 0..len / size_of::<libc::c_int>() {
                fds.push(OwnedFd::from_raw_fd(data.add(k).read_unaligned()));
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok(n as usize)
}

/// Reads the answer: every byte and descriptor until the server closes. The answer is exactly
/// one line.
pub fn receive(stream: &UnixStream) -> Claim {
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match recv_once(stream, &mut buf, &mut fds) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // A server that closes with bytes of ours unread resets the connection; what it
            // sent before is still read first.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !bytes.is_empty() => {
                break;
            }
            Err(e) => panic!("reading the claim's answer: {e}"),
        }
    }
    assert_eq!(
        bytes.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one line: {}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(bytes.last(), Some(&b'\n'));
    let line: Value = serde_json::from_slice(&bytes).unwrap();
    Claim { line, fds }
}

/// An export's byte range in this process: its segments mapped back to back, read and write.
pub struct Mapped {
    base: *mut u8,
    len: usize,
}

impl Mapped {
    /// Maps a good claim's segments: reserves the range, then maps each descriptor at its
    /// segment's offset (`MAP_FIXED`), from its `file_offset`.
    pub fn new(claim: &Claim) -> Mapped {
        let line = &claim.line;
        assert!(line["error_code"].is_null(), "a refused claim: {line}");
        let len = line["size_bytes"].as_u64().unwrap() as usize;
        let segments = line["segments"].as_array().unwrap();
        assert_eq!(
            segments.len(),
            claim.fds.len(),
            "one descriptor per segment"
        );
        // SAFETY: a fresh anonymous reservation; nothing else is mapped there.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let mut next = 0u64;
        for (s, fd) in segments.iter().zip(&claim.fds) {
            let (offset, size, file_offset) = (
                s["offset"].as_u64().unwrap(),
                s["size_bytes"].as_u64().unwrap(),
                s["file_offset"].as_u64().unwrap(),
            );
            assert_eq!(offset, next, "segments follow each other from offset 0");
            next = offset + size;
            // SAFETY: within the reservation made above (checked against `len` below).
            let at = unsafe {
                libc::mmap(
                    base.cast::<u8>().add(offset as usize).cast(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    file_offset as libc::off_t,
                )
            };
            assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        }
        assert_eq!(next as usize, len, "the segments cover the export's range");
        Mapped {
            base: base.cast(),
            len,
        }
    }

    /// The export's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: mapped for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    /// The export's bytes, to write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, mapped read and write.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the range mapped in `new`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
