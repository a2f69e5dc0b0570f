//! The bytes under a socket: a TCP stream, or a TCP stream with a TLS session on it.
//!
//! The socket's code reads and writes plaintext through [`Wire`] without waiting, as it does
//! on plain TCP: a read that finds nothing and a write the kernel does not take end in
//! `WouldBlock`, which comes from the TCP stream itself and so clears its readiness (the
//! socket's task then waits on the stream's readiness as before).
//!
//! With TLS, rustls holds what it decrypted but the socket has not read, and what it
//! encrypted but the kernel has not taken. Both are bounded per socket:
//! - a read takes decrypted bytes first and reads more from the kernel only when none are
//!   left, so rustls holds at most one record (16 KiB) of plaintext, and a partial record;
//!   these are not counted in the buffer budget (docs/HOSTILE-INPUT.md sizes them);
//! - a write is taken only when nothing encrypted is still waiting, and at most
//!   [`TLS_WRITE_CHUNK`] bytes of it, so rustls holds at most one chunk of ciphertext. The
//!   socket counts those bytes in the buffer budget until they are out
//!   ([`Wire::has_pending_output`]; see `SocketState::flush`).

use std::io::{self, IoSlice, Read, Write};
use std::sync::{Mutex, MutexGuard};

use switchboard_tls::rustls::ServerConnection;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The most plaintext one write hands to rustls: one TLS record.
pub(crate) const TLS_WRITE_CHUNK: usize = 16 * 1024;

/// Frames up to this size (head and payload) are copied into one buffer and sent with one
/// `send`: cheaper than `sendmsg` with two slices, and both are far cheaper than `writev`,
/// which goes through the VFS layer (`vfs_writev`, `fdget_pos`: a tenth of the server's time
/// in a broadcast to 10k sockets, profiled).
const COPY_UNDER: usize = 2048;

/// `send` flags: no SIGPIPE on a connection the peer has reset, whatever the process's
/// signal disposition (a library cannot rely on Rust's `main` having ignored SIGPIPE).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

pub(crate) struct Wire {
    tcp: TcpStream,
    /// Boxed: a rustls session is about a kilobyte, which every plain socket would carry
    /// inline otherwise.
    tls: Option<Box<Mutex<ServerConnection>>>,
}

fn lock(tls: &Mutex<ServerConnection>) -> MutexGuard<'_, ServerConnection> {
    tls.lock().unwrap_or_else(|e| e.into_inner())
}

/// `io::Read` and `io::Write` on the TCP stream for rustls, without waiting.
struct Raw<'a>(&'a TcpStream);

impl Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*socket2::SockRef::from(self.0)).read(buf)
    }
}

impl Write for Raw<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send_with_flags(buf, SEND_FLAGS)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send_vectored_with_flags(bufs, SEND_FLAGS)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Wire {
    /// Plain TCP.
    pub(crate) fn plain(tcp: TcpStream) -> Wire {
        Wire { tcp, tls: None }
    }

    /// A TCP stream whose TLS handshake is done.
    pub(crate) fn tls(tcp: TcpStream, mut session: ServerConnection) -> Wire {
        // Belt and braces: `write` hands over one chunk at a time anyway.
        session.set_buffer_limit(Some(2 * TLS_WRITE_CHUNK));
        Wire {
            tcp,
            tls: Some(Box::new(Mutex::new(session))),
        }
    }

    /// The TCP stream, for its readiness.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads once into `buf`: the bytes read (0 at the end of the stream) and whether that
    /// emptied everything there was to read (the stream's readiness is then cleared). Plain
    /// TCP reads straight from the kernel (`read_plain`); TLS decrypts first.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let Some(tls) = &self.tls else {
            return read_plain(&self.tcp, buf);
        };
        let mut session = lock(tls);
        loop {
            match session.reader().read(buf) {
                // Decrypted bytes; 0 at the client's close_notify, the end of the stream.
                Ok(n) => return Ok((n, false)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok((0, false)),
                Err(e) => return Err(e),
            }
            // Nothing decrypted is left: read more records from the kernel. `WouldBlock`
            // here clears the stream's readiness.
            let n = self
                .tcp
                .try_io(Interest::READABLE, || session.read_tls(&mut Raw(&self.tcp)))?;
            if n == 0 {
                return Ok((0, false));
            }
            if let Err(e) = session.process_new_packets() {
                // rustls has queued an alert for the peer: send it if the kernel takes it.
                let _ = session.write_tls(&mut Raw(&self.tcp));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // An alert, say (rustls sends a key update's answer ahead of the next record it
            // writes): written now if the kernel takes it, else it waits for the socket's
            // task (the caller sees `has_pending_output`).
            match flush_session(&self.tcp, &mut session) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }

    /// Writes plaintext without waiting, from any task: how many bytes of `bufs` were taken
    /// (written, or with TLS encrypted and at least begun). `WouldBlock` when the kernel takes
    /// nothing.
    ///
    /// On plain TCP this skips tokio's readiness bookkeeping (a cache miss per socket in a
    /// broadcast): a `WouldBlock` here does not clear the stream's write readiness, so the
    /// socket's task, woken for the backlog, makes one more attempt through
    /// [`Wire::write`], which does.
    pub(crate) fn send_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return send_plain(&self.tcp, bufs);
        };
        let mut session = lock(tls);
        // What was encrypted before goes first; nothing more is taken until it is out.
        flush_session(&self.tcp, &mut session)?;
        let mut taken = 0;
        for buf in bufs {
            let part = &buf[..buf.len().min(TLS_WRITE_CHUNK - taken)];
            let n = session.writer().write(part)?;
            taken += n;
            if n < buf.len() || taken == TLS_WRITE_CHUNK {
                break;
            }
        }
        if taken == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // Nothing waits in rustls, so it has room: this does not happen.
            return Err(io::ErrorKind::WriteZero.into());
        }
        // The records go out as far as the kernel takes them; the rest waits in rustls.
        match flush_session(&self.tcp, &mut session) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(taken)
    }

    /// Writes plaintext for the socket's task: as [`Wire::send_now`], and a `WouldBlock`
    /// clears the stream's write readiness, so the task can wait for it.
    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => self
                .tcp
                .try_io(Interest::WRITABLE, || Raw(&self.tcp).write(buf)),
            Some(_) => self.send_now(&[IoSlice::new(buf)]),
        }
    }

    /// Whether TLS records wait for the kernel to take them.
    pub(crate) fn has_pending_output(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| lock(tls).wants_write())
    }

    /// Writes the TLS records that wait; `WouldBlock` while some are left. `wrote` is set
    /// when the kernel took any of them (progress, for the heartbeat's stall check).
    pub(crate) fn flush_output(&self, wrote: &mut bool) -> io::Result<()> {
        match &self.tls {
            None => Ok(()),
            Some(tls) => flush_counting(&self.tcp, &mut lock(tls), wrote),
        }
    }

    /// Ends the connection now: with TLS, a close_notify first if the kernel takes it.
    pub(crate) fn shutdown(&self) {
        if let Some(tls) = &self.tls {
            let mut session = lock(tls);
            session.send_close_notify();
            let _ = flush_session(&self.tcp, &mut session);
        }
        let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Both);
    }
}

/// One `send` (or `sendmsg` for a large frame) of `bufs` on plain TCP.
fn send_plain(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    match bufs {
        [one] => Raw(tcp).write(one),
        // Most frames are small: the buffer they are joined in is zeroed first, so it is
        // sized to them (zeroing 2 KiB for every 100-byte frame showed in the profile).
        _ if total <= SMALL_FRAME => send_joined::<SMALL_FRAME>(tcp, bufs, total),
        _ if total <= COPY_UNDER => send_joined::<COPY_UNDER>(tcp, bufs, total),
        _ => Raw(tcp).write_vectored(bufs),
    }
}

/// What most frames fit in (a reply, a chat message): joined in a buffer this large.
const SMALL_FRAME: usize = 256;

/// Copies `bufs` (`total` bytes, at most `N`) into one buffer and sends it with one `send`.
fn send_joined<const N: usize>(
    tcp: &TcpStream,
    bufs: &[IoSlice<'_>],
    total: usize,
) -> io::Result<usize> {
    let mut joined = [0u8; N];
    let mut at = 0;
    for buf in bufs {
        joined[at..at + buf.len()].copy_from_slice(buf);
        at += buf.len();
    }
    Raw(tcp).write(&joined[..total])
}

/// Writes what rustls holds until it is all out (`Ok`) or the kernel is full (`WouldBlock`,
/// which clears the stream's write readiness).
fn flush_session(tcp: &TcpStream, session: &mut ServerConnection) -> io::Result<()> {
    flush_counting(tcp, session, &mut false)
}

/// [`flush_session`], setting `wrote` when the kernel took any bytes.
fn flush_counting(
    tcp: &TcpStream,
    session: &mut ServerConnection,
    wrote: &mut bool,
) -> io::Result<()> {
    while session.wants_write() {
        match tcp.try_io(Interest::WRITABLE, || session.write_tls(&mut Raw(tcp))) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => *wrote = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads once; returns the bytes read and whether that emptied the kernel's buffer.
///
/// A read shorter than `buf` got everything the kernel had, so the socket's readiness is
/// cleared there and then (tokio's own `poll_read` does the same), instead of learning it
/// from one more `read` that fails with `WouldBlock`: that saves a system call per wake-up,
/// which for small request/response traffic is a third of them. The readiness cleared is the
/// one seen before the read, so data arriving after it still wakes the socket.
fn read_plain(stream: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut short = 0;
    let read = stream.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(stream)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into()); // makes try_io clear the readiness
        }
        Ok(n)
    });
    match read {
        Ok(n) => Ok((n, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok((short, true)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_wire_is_not_larger_than_its_stream_and_a_pointer() {
        // Idle memory per socket is a benchmark target: the TLS session must not sit inline.
        assert!(
            std::mem::size_of::<Wire>()
                <= std::mem::size_of::<TcpStream>() + std::mem::size_of::<usize>()
        );
    }

    /// Every way a frame leaves (joined in a small or a large buffer, or `sendmsg`) sends its
    /// parts whole and in order, at each boundary between them.
    #[tokio::test]
    async fn head_and_payload_arrive_whole_at_every_size_boundary() {
        use tokio::io::AsyncReadExt;
        let (server, _, mut client) = crate::test_support::loopback_pair().await;
        for total in [0, 1, 2, 255, 256, 257, 2047, 2048, 2049, 5000] {
            let head: Vec<u8> = (0..total.min(10)).map(|i| i as u8).collect();
            let payload: Vec<u8> = (head.len()..total).map(|i| (i % 251) as u8).collect();
            let bufs = [IoSlice::new(&head), IoSlice::new(&payload)];
            // Small amounts on an empty socket buffer: the kernel takes them at once.
            assert_eq!(send_plain(&server, &bufs).unwrap(), total, "{total}");
            let mut got = vec![0; total];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [head, payload].concat(), "{total}");
        }
    }
}
