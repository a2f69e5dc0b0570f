//! Does io_uring make a broadcast's fan-out cheaper? One plain `send` per subscriber socket
//! against the same sends submitted to an io_uring in batches (one `io_uring_enter` per
//! batch), on the same loopback TCP sockets, in alternating turns, with the sending process's
//! CPU time per delivered message for each (all its threads; with `MSG_DONTWAIT` the kernel
//! completes each send at once and hands none to io_uring's worker threads).
//!
//! ```text
//! uring-fanout [--subscribers 9000] [--secs 8] [--turn-ms 250] [--batch 4096]
//!              [--payload 100] [--sender-core 0] [--receiver-core 1]
//! ```
//!
//! The process listens on 127.0.0.1, starts itself again as the receiver (which connects
//! every subscriber socket and reads them in a loop that never sleeps), and sends one
//! payload to every socket per broadcast, back to back, in turns of `--turn-ms` that
//! alternate the two ways of sending. Between turns it pauses 20 ms for the receiver to
//! drain. At the end it closes the sockets, and the receiver reports the bytes it read. The
//! run fails unless they are exactly the bytes sent and each way delivered, and on any send
//! error other than a full socket buffer (counted as `short`).
//! Plain TCP, no WebSocket framing: what the kernel costs per delivery, which is what
//! io_uring can change. Each process pins itself to its core (`sched_setaffinity`).

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

struct Options {
    subscribers: usize,
    secs: f64,
    turn_ms: u64,
    batch: usize,
    payload: usize,
    sender_core: usize,
    receiver_core: usize,
    /// Set in the receiver: the port to connect to.
    receive_from: Option<u16>,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        subscribers: 9000,
        secs: 8.0,
        turn_ms: 250,
        batch: 4096,
        payload: 100,
        sender_core: 0,
        receiver_core: 1,
        receive_from: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: String| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--subscribers" => o.subscribers = value.parse().map_err(|e| bad(format!("{e}")))?,
            "--secs" => o.secs = value.parse().map_err(|e| bad(format!("{e}")))?,
            "--turn-ms" => o.turn_ms = value.parse().map_err(|e| bad(format!("{e}")))?,
            "--batch" => o.batch = value.parse().map_err(|e| bad(format!("{e}")))?,
            "--payload" => o.payload = value.parse().map_err(|e| bad(format!("{e}")))?,
            "--sender-core" => o.sender_core = value.parse().map_err(|e| bad(format!("{e}")))?,
            "--receiver-core" => {
                o.receiver_core = value.parse().map_err(|e| bad(format!("{e}")))?
            }
            "--receive-from" => {
                o.receive_from = Some(value.parse().map_err(|e| bad(format!("{e}")))?)
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    // Both processes hold one descriptor per subscriber; a process may hold 20,000 here.
    if !(1..=9900).contains(&o.subscribers) {
        return Err("--subscribers must be 1..=9900".into());
    }
    if !(1..=32768).contains(&o.batch) || o.payload == 0 || o.secs <= 0.0 || o.turn_ms == 0 {
        return Err("--batch must be 1..=32768; --payload, --secs and --turn-ms above 0".into());
    }
    Ok(o)
}

fn pin(core: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot pin to core {core}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// User + system CPU seconds of this process, every thread (io-wq workers included).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// The receiver: connects, reads every socket until each has closed, prints the bytes read.
fn receive(port: u16, subscribers: usize, secs: f64) -> Result<(), String> {
    let mut sockets = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        sockets.push(Some(s));
    }
    println!("CONNECTED");
    let mut buf = vec![0u8; 1 << 16];
    let (mut total, mut open) = (0u64, subscribers);
    // The sender's run and a minute more: a receiver never outlives a lost sender for long.
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 60.0);
    while open > 0 && Instant::now() < deadline {
        for slot in sockets.iter_mut() {
            let Some(s) = slot else { continue };
            match s.read(&mut buf) {
                Ok(0) => {
                    *slot = None;
                    open -= 1;
                }
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
    println!("RECEIVED {total}");
    Ok(())
}

#[derive(Default)]
struct Tally {
    delivered: u64,
    short: u64,
    cpu: f64,
}

fn send(o: &Options) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut receiver = Command::new(me)
        .args(["--subscribers", &o.subscribers.to_string()])
        .args(["--secs", &o.secs.to_string()])
        .args(["--receiver-core", &o.receiver_core.to_string()])
        .args(["--receive-from", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let mut said = BufReader::new(receiver.stdout.take().ok_or("no receiver stdout")?).lines();
    let mut sockets = Vec::with_capacity(o.subscribers);
    for _ in 0..o.subscribers {
        let (s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        sockets.push(s);
    }
    match said.next() {
        Some(Ok(line)) if line == "CONNECTED" => {}
        other => return Err(format!("receiver did not connect: {other:?}")),
    }
    let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    let payload = vec![b'x'; o.payload];
    let len = payload.len();
    let mut ring = IoUring::new(o.batch.next_power_of_two() as u32)
        .map_err(|e| format!("io_uring unavailable: {e}"))?;
    // Both ways send without waiting: a full socket buffer counts as short, not as a wait.
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let mut tally = [Tally::default(), Tally::default()];
    let mut sent_bytes = 0u64;
    let start = Instant::now();
    let mut turn = 0usize;
    while start.elapsed().as_secs_f64() < o.secs {
        let way = turn % 2;
        turn += 1;
        let t = &mut tally[way];
        let cpu0 = cpu_secs();
        let began = Instant::now();
        while began.elapsed() < Duration::from_millis(o.turn_ms) {
            if way == 0 {
                for &fd in &fds {
                    // SAFETY: fd is an open socket of ours; the buffer outlives the call.
                    let n = unsafe { libc::send(fd, payload.as_ptr().cast(), len, flags) };
                    let n = if n < 0 {
                        -std::io::Error::last_os_error()
                            .raw_os_error()
                            .unwrap_or(libc::EIO)
                    } else {
                        n as i32
                    };
                    count(t, &mut sent_bytes, n, len)?;
                }
            } else {
                for batch in fds.chunks(o.batch) {
                    {
                        let mut sq = ring.submission();
                        for &fd in batch {
                            let sqe =
                                opcode::Send::new(types::Fd(fd), payload.as_ptr(), len as u32)
                                    .flags(flags)
                                    .build();
                            // SAFETY: the payload outlives the batch (it is waited for below);
                            // the queue has room for a whole batch (sized to it, drained each time).
                            unsafe { sq.push(&sqe) }.map_err(|_| "submission queue full")?;
                        }
                    }
                    ring.submit_and_wait(batch.len())
                        .map_err(|e| e.to_string())?;
                    for cqe in ring.completion() {
                        count(t, &mut sent_bytes, cqe.result(), len)?;
                    }
                }
            }
        }
        t.cpu += cpu_secs() - cpu0;
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(sockets);
    let received = match said.next() {
        Some(Ok(line)) => line
            .strip_prefix("RECEIVED ")
            .and_then(|n| n.parse::<u64>().ok()),
        _ => None,
    };
    let _ = receiver.wait();
    for (way, name) in [(0, "send"), (1, "io_uring")] {
        let t = &tally[way];
        println!(
            "RESULT way={name} subscribers={} batch={} delivered={} short={} cpu={:.3} us_per_delivery={:.3}",
            o.subscribers,
            o.batch,
            t.delivered,
            t.short,
            t.cpu,
            t.cpu * 1e6 / t.delivered.max(1) as f64
        );
    }
    let per = |t: &Tally| t.cpu / t.delivered.max(1) as f64;
    println!("RATIO io_uring/send={:.3}", per(&tally[1]) / per(&tally[0]));
    if let Some(t) = tally.iter().find(|t| t.delivered == 0) {
        return Err(format!(
            "a way of sending delivered nothing ({} short sends)",
            t.short
        ));
    }
    match received {
        Some(r) if r == sent_bytes => Ok(()),
        other => Err(format!(
            "sent {sent_bytes} bytes, the receiver read {other:?}"
        )),
    }
}

/// Counts one send's result: `n` bytes taken of `len`, or `-errno`. A full socket buffer
/// (`EAGAIN`) is a short send; any other error ends the run, so that a way of sending that
/// does not work (say, a kernel without io_uring's send) cannot pass as one that was slow.
fn count(t: &mut Tally, sent_bytes: &mut u64, n: i32, len: usize) -> Result<(), String> {
    if n < 0 && n != -libc::EAGAIN {
        return Err(format!(
            "send failed: {}",
            std::io::Error::from_raw_os_error(-n)
        ));
    }
    let n = n.max(0) as u64;
    *sent_bytes += n;
    if n == len as u64 {
        t.delivered += 1;
    } else {
        t.short += 1;
    }
    Ok(())
}

fn main() -> ExitCode {
    let run = || -> Result<(), String> {
        let o = parse()?;
        match o.receive_from {
            Some(port) => {
                pin(o.receiver_core)?;
                receive(port, o.subscribers, o.secs)
            }
            None => {
                pin(o.sender_core)?;
                send(&o)
            }
        }
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uring-fanout: {e}");
            ExitCode::FAILURE
        }
    }
}
