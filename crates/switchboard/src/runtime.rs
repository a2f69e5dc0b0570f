//! The tokio runtime a gateway runs on, with a chosen number of worker threads.

/// A runtime with `workers` worker threads (`None`: `TOKIO_WORKER_THREADS` if set, else one per
/// core this process may use, which respects `taskset` and cgroup CPU limits). With one worker
/// it is tokio's current-thread scheduler: the same one thread, without the work-stealing
/// scheduler's bookkeeping (atomic task states, the queue other workers would steal from),
/// about 185 fewer instructions per echo (docs/PERFORMANCE.md, "One worker, one scheduler").
/// On that scheduler, spawned tasks run only while the runtime is inside `block_on` (the
/// binary's whole life). Timers and I/O are enabled. Fails if `TOKIO_WORKER_THREADS` is set
/// to anything but 1 to [`MAX_WORKERS`].
///
/// ```
/// let runtime = switchboard::runtime(Some(1)).unwrap();
/// assert_eq!(runtime.block_on(async { 1 + 1 }), 2);
/// ```
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match workers {
        Some(n) => n,
        // Unset, tokio's own variable still counts, as it does for tokio's default runtime.
        None => match std::env::var("TOKIO_WORKER_THREADS") {
            Ok(text) => workers_from_env(&text)?,
            Err(_) => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        },
    };
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
}

/// The most worker threads `TOKIO_WORKER_THREADS` (or the binary's `--workers`) may ask for.
pub const MAX_WORKERS: usize = 1024;

/// `TOKIO_WORKER_THREADS`' value as a worker count: 1 to [`MAX_WORKERS`], or an error that
/// names the variable (a typo must not quietly start one worker per core instead).
fn workers_from_env(text: &str) -> std::io::Result<usize> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_WORKERS).contains(n))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "TOKIO_WORKER_THREADS is `{text}`: it must be a whole number from 1 to \
                     {MAX_WORKERS}"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::{runtime, workers_from_env, MAX_WORKERS};

    #[test]
    fn a_worker_count_from_the_environment_is_checked() {
        assert_eq!(workers_from_env("4").unwrap(), 4);
        assert_eq!(workers_from_env(" 1 ").unwrap(), 1);
        assert_eq!(workers_from_env("1024").unwrap(), MAX_WORKERS);
        for bad in [
            "0",
            "1025",
            "-1",
            "four",
            "",
            "1e3",
            "99999999999999999999999",
        ] {
            let e = workers_from_env(bad).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains("TOKIO_WORKER_THREADS"), "{e}");
        }
    }

    #[test]
    fn one_worker_is_the_current_thread_scheduler_and_more_are_multi_thread() {
        let one = runtime(Some(1)).unwrap();
        assert_eq!(
            one.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        assert_eq!(one.metrics().num_workers(), 1);
        let zero = runtime(Some(0)).unwrap();
        assert_eq!(
            zero.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let three = runtime(Some(3)).unwrap();
        assert_eq!(
            three.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(three.metrics().num_workers(), 3);
    }
}
