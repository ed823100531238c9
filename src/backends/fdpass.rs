//! Passing file descriptors to another process over a Unix stream socket (SCM_RIGHTS), for the
//! claim of an export (the contract's section 8.3). The one `sendmsg` with ancillary data the
//! crate makes; everything above it is safe code.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one `sendmsg` carries (the contract's limit; Linux allows 253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Writes `bytes` to `stream`, with `fds` passed as SCM_RIGHTS on them: at most
/// [`MAX_FDS_PER_MESSAGE`] per `sendmsg`, the bytes split so that every message carries at least
/// one byte (a message of descriptors alone is not delivered). `bytes` must be at least as long
/// as the number of messages needed. Blocks until everything is written.
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let groups: Vec<&[BorrowedFd<'_>]> = fds.chunks(MAX_FDS_PER_MESSAGE).collect();
    if groups.len() > bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fewer bytes than messages needed to carry the descriptors",
        ));
    }
    let mut at = 0usize;
    for (k, group) in groups.iter().enumerate() {
        // The last group takes every remaining byte; the others one byte each at least.
        let end = if k + 1 == groups.len() {
            bytes.len()
        } else {
            at + 1
        };
        let mut sent_fds = false;
        while at < end {
            let n = send_one(stream, &bytes[at..end], if sent_fds { &[] } else { group })?;
            sent_fds = true;
            at += n;
        }
    }
    // Bytes with no descriptor left (none when `fds` is empty and `bytes` is too).
    while at < bytes.len() {
        at += send_one(stream, &bytes[at..], &[])?;
    }
    Ok(())
}

/// One `sendmsg` of `bytes` with `fds` (at most [`MAX_FDS_PER_MESSAGE`]); returns the bytes
/// written (the descriptors go with the first of them).
fn send_one(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<libc::c_int> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if raw.is_empty() {
        0
    } else {
        unsafe { libc::CMSG_SPACE(fd_bytes as u32) as usize }
    };
    // u64 words: aligned as cmsghdr needs.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, aligned, as CMSG_SPACE(fd_bytes)
        // requires; CMSG_FIRSTHDR is then non-null and CMSG_DATA has room for `fd_bytes`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (the caller's bytes, only read) and `control`, both
        // alive for the call; the descriptors are borrowed, so open.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `fd` has something to read now (data, end of file or an error), without waiting:
/// `poll` with a timeout of zero. For a reader that spins briefly before it blocks.
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, borrowed for the call; a timeout of 0 never blocks.
    let n = unsafe { libc::poll(&raw mut p, 1, 0) };
    n > 0 && p.revents != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// Receives one message with room for `max` descriptors.
    fn recv(stream: &UnixStream, buf: &mut [u8], max: usize) -> (usize, Vec<i32>) {
        let space = unsafe { libc::CMSG_SPACE((max * 4) as u32) as usize };
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, 0) };
        assert!(n >= 0);
        let mut fds = Vec::new();
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<i32>();
                for k in 0..len / 4 {
                    fds.push(*data.add(k));
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        (n as usize, fds)
    }

    #[test]
    fn more_descriptors_than_one_message_takes_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..300).map(|_| file.as_fd()).collect();
        let line = vec![b'x'; 1000];
        send_with_fds(&a, &line, &fds).unwrap();
        drop(a);
        let (mut got, mut bytes) = (Vec::new(), 0);
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, fds) = recv(&b, &mut buf, 253);
            if n == 0 {
                break;
            }
            bytes += n;
            got.extend(fds);
        }
        assert_eq!(bytes, 1000);
        assert_eq!(got.len(), 300);
        for fd in got {
            unsafe { libc::close(fd) };
        }
        let mut rest = Vec::new();
        (&b).read_to_end(&mut rest).unwrap();
    }
}
