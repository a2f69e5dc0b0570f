//! The measuring: a run's timeline, CPU sampling, and the tally of what round-trip workers saw.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use switchboard_bench::procfs::{self, Ticks};
use switchboard_bench::result_line;
use switchboard_bench::stats::Samples;

/// The timeline of a measured run, fixed once every socket is connected.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    pub(crate) base: Instant,
    pub(crate) warm: Instant,
    pub(crate) end: Instant,
    /// No run goes on past this, whatever is still in flight.
    pub(crate) hard: Instant,
}

impl Clock {
    pub(crate) fn start(warmup: f64, secs: f64) -> Clock {
        let base = Instant::now();
        let warm = base + Duration::from_secs_f64(warmup.max(0.0));
        let end = warm + Duration::from_secs_f64(secs.max(0.1));
        Clock {
            base,
            warm,
            end,
            hard: end + Duration::from_secs(5),
        }
    }

    pub(crate) fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.base).as_nanos() as u64
    }

    pub(crate) fn measured(&self, t: Instant) -> bool {
        t >= self.warm && t < self.end
    }

    pub(crate) fn window_secs(&self) -> f64 {
        (self.end - self.warm).as_secs_f64()
    }
}

/// CPU time (`/proc`, in clock ticks) of this process and of the server, read together.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct CpuTicks {
    pub(crate) client: Option<u64>,
    /// `None` without the server's PID. User and kernel apart: see [`ServerCores`].
    pub(crate) server: Option<Ticks>,
}

impl CpuTicks {
    pub(crate) fn now(server_pid: Option<u32>) -> CpuTicks {
        CpuTicks {
            client: procfs::cpu_ticks(None),
            server: server_pid.and_then(|p| procfs::cpu_ticks_split(Some(p))),
        }
    }

    /// The ticks the client and the server used from `self` to `later` (0 where a reading
    /// is missing).
    pub(crate) fn until(self, later: CpuTicks) -> (u64, Ticks) {
        let client = self
            .client
            .zip(later.client)
            .map_or(0, |(b, a)| a.saturating_sub(b));
        let server = self
            .server
            .zip(later.server)
            .map_or(Ticks::default(), |(b, a)| a.since(b));
        (client, server)
    }
}

/// The server's CPU over a window, in cores: all of it, and the part spent in the kernel.
///
/// On loopback the kernel's part holds the sends and receives a server asks for and, on the
/// sending core, the receiving socket's side of each send: work every server pays alike for
/// the same traffic. What user-space work could ever gain is bounded by it (`cargo xtask
/// bench` reports that ceiling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ServerCores {
    pub(crate) all: f64,
    pub(crate) kernel: f64,
}

impl ServerCores {
    /// `ticks` used over `secs` seconds (`None` for an empty window).
    pub(crate) fn of(ticks: Ticks, secs: f64) -> Option<ServerCores> {
        let cores = |t: u64| t as f64 / procfs::TICKS_PER_SEC / secs;
        (secs > 0.0).then(|| ServerCores {
            all: cores(ticks.total()),
            kernel: cores(ticks.system),
        })
    }
}

/// `server_cpu` and `server_sys_cpu` (its kernel part), in cores; `na` where unknown.
pub(crate) fn server_cpu_fields(server: Option<ServerCores>) -> [(&'static str, String); 2] {
    [
        ("server_cpu", fmt_cores(server.map(|s| s.all))),
        ("server_sys_cpu", fmt_cores(server.map(|s| s.kernel))),
    ]
}

/// Between turns: a server is quiet once its CPU time has not moved for `QUIET_STEP` (its
/// clock ticks are 10 ms), waited for at most `QUIET_LIMIT`.
const QUIET_STEP: Duration = Duration::from_millis(20);
pub(crate) const QUIET_LIMIT: Duration = Duration::from_millis(200);

/// Waits until server `pid` has used no CPU for [`QUIET_STEP`], at most [`QUIET_LIMIT`]: so
/// that work it put off (a runtime's garbage collection) does not land on the next server's
/// turn.
pub(crate) fn wait_quiet(pid: Option<u32>) {
    let Some(pid) = pid else {
        return;
    };
    let deadline = Instant::now() + QUIET_LIMIT;
    let mut last = procfs::cpu_ticks(Some(pid));
    while Instant::now() < deadline {
        std::thread::sleep(QUIET_STEP);
        let now = procfs::cpu_ticks(Some(pid));
        if now == last {
            return;
        }
        last = now;
    }
}

/// CPU of client and server over the measured window, sampled by a task of its own.
pub(crate) fn sample_cpu(clock: Clock, server_pid: Option<u32>) -> JoinHandle<Cores> {
    tokio::spawn(async move {
        tokio::time::sleep_until(clock.warm.into()).await;
        let (before, t0) = (CpuTicks::now(server_pid), Instant::now());
        tokio::time::sleep_until(clock.end.into()).await;
        let secs = t0.elapsed().as_secs_f64();
        let after = CpuTicks::now(server_pid);
        let server = before
            .server
            .zip(after.server)
            .and_then(|(b, a)| ServerCores::of(a.since(b), secs));
        (procfs::cores(before.client, after.client, secs), server)
    })
}

/// The client's CPU in cores and the server's, where known.
pub(crate) type Cores = (Option<f64>, Option<ServerCores>);

/// The `RESULT` line of a latency scenario (echo, send, cross-node, handshake): `head` (the
/// scenario and its parameters), then what the workers measured and the CPU over the window.
pub(crate) async fn latency_result(
    mut head: Vec<(&'static str, String)>,
    workers: Vec<JoinHandle<Tally>>,
    cpu: JoinHandle<Cores>,
    clock: &Clock,
    pool: Option<&Path>,
) -> String {
    let Tally {
        samples: all,
        errors,
        idle,
        ..
    } = Tally::join_all(workers).await;
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
    let samples = Samples::new(all);
    head.extend([
        ("count", samples.len().to_string()),
        (
            "rate",
            format!("{:.0}", samples.len() as f64 / clock.window_secs()),
        ),
    ]);
    head.extend(client_cpu_fields(client_cpu, idle, clock.window_secs()));
    head.extend(server_cpu_fields(server_cpu));
    head.push(("errors", errors.to_string()));
    head.extend(percentiles(&samples, ["p50_us", "p99_us", "p999_us"]));
    head.extend(pooled(pool, &samples));
    result_line(&head)
}

/// `client_cpu`: the client's CPU over the window, less the time a spinning loop spent in
/// polls that found nothing (`client_idle`, reported too when there was any), so a client
/// that never sleeps still shows how busy it was.
pub(crate) fn client_cpu_fields(
    measured: Option<f64>,
    idle: Duration,
    window_secs: f64,
) -> Vec<(&'static str, String)> {
    if idle.is_zero() || window_secs <= 0.0 {
        return vec![("client_cpu", fmt_cores(measured))];
    }
    let idle = idle.as_secs_f64() / window_secs;
    vec![
        (
            "client_cpu",
            fmt_cores(measured.map(|cpu| (cpu - idle).max(0.0))),
        ),
        ("client_idle", fmt_cores(Some(idle))),
    ]
}

/// With `--samples-file`: appends `samples` to the file and returns the percentiles of all
/// the samples in it (`pooled_count`, `pooled_p50_us`, ...), or `pooled_error`.
pub(crate) fn pooled(pool: Option<&Path>, samples: &Samples) -> Vec<(&'static str, String)> {
    let Some(path) = pool else {
        return Vec::new();
    };
    let append = || -> std::io::Result<Samples> {
        let bytes: Vec<u8> = samples
            .values()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(&bytes)?;
        let all = std::fs::read(path)?;
        if all.len() % 8 != 0 {
            return Err(std::io::Error::other("not a whole number of samples"));
        }
        Ok(Samples::new(
            all.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    };
    match append() {
        Ok(all) => {
            let mut fields = vec![("pooled_count", all.len().to_string())];
            fields.extend(percentiles(
                &all,
                ["pooled_p50_us", "pooled_p99_us", "pooled_p999_us"],
            ));
            fields
        }
        Err(e) => {
            eprintln!("bench-client: {}: {e}", path.display());
            vec![("pooled_error", "1".into())]
        }
    }
}

/// The 50th, 99th and 99.9th percentiles of `samples` in microseconds, under `keys`.
pub(crate) fn percentiles(
    samples: &Samples,
    keys: [&'static str; 3],
) -> [(&'static str, String); 3] {
    let [p50, p99, p999] = keys;
    [(p50, 50.0), (p99, 99.0), (p999, 99.9)]
        .map(|(key, p)| (key, format!("{:.1}", samples.percentile_us(p))))
}

pub(crate) fn fmt_cores(c: Option<f64>) -> String {
    c.map_or("na".into(), |c| format!("{c:.2}"))
}

/// What one round-trip worker saw.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) samples: Vec<u64>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    /// A spinning poll loop's time in the measured window spent in polls that found nothing.
    pub(crate) idle: Duration,
}

impl Tally {
    pub(crate) fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    /// Waits for every worker and adds up what they saw (a worker that panicked counts as an
    /// error); reports the first error on stderr.
    pub(crate) async fn join_all(workers: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
        let mut total = Tally::default();
        for w in workers {
            match w.await {
                Ok(t) => {
                    total.samples.extend(t.samples);
                    total.errors += t.errors;
                    total.first_error = total.first_error.or(t.first_error);
                    total.idle += t.idle;
                }
                Err(e) => total.error(e),
            }
        }
        if let Some(e) = &total.first_error {
            eprintln!("bench-client: {} errors, first: {e}", total.errors);
        }
        total
    }
}
