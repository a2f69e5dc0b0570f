//! The tokio runtime a gateway runs on, with a chosen number of worker threads.

/// A runtime with `workers` worker threads (`None`: `TOKIO_WORKER_THREADS` if set, else one per
/// core this process may use, which respects `taskset` and cgroup CPU limits). With one worker it is tokio's current-thread
/// scheduler: the same one thread, without the work-stealing scheduler's bookkeeping (atomic
/// task states, the queue other workers would steal from), about 185 fewer instructions per
/// echo (docs/PERFORMANCE.md, "One worker, one scheduler"). On that scheduler, spawned tasks
/// run only while the runtime is inside `block_on` (the binary's whole life). Timers and I/O
/// are enabled.
///
/// ```
/// let runtime = switchboard::runtime(Some(1)).unwrap();
/// assert_eq!(runtime.block_on(async { 1 + 1 }), 2);
/// ```
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    // Unset, tokio's own variable still counts, as it does for tokio's default runtime.
    let from_env = || {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|n| n.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    let workers = workers.or_else(from_env).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::runtime;

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
