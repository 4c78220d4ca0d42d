//! What the capability benches (`durable`, `queue`) share: sizes from the
//! environment, a throwaway server and runtime, and the ratio line format.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use pg_pubsub::testing::TestServer;

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// `name` from the environment (underscores allowed: `1_000_000`), else `default`.
pub fn env_u64(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => Ok(v.replace('_', "").parse()?),
        Err(_) => Ok(default),
    }
}

/// Runs `bench` on a multi-threaded runtime against a throwaway server
/// (or `DATABASE_URL`).
pub fn run_main<F, Fut>(bench: F) -> Res<()>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Res<()>>,
{
    let server = TestServer::from_env_or_start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(server.url().to_owned()))
}

pub fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// One measured line: this crate (`ours`, labelled `label`) against bare SQL.
pub fn line(what: &str, label: &str, ours: f64, bare: f64, unit: &str) {
    println!(
        "{what:<44} {label} {ours:>10.0} {unit:<6} bare {bare:>10.0} {unit:<6} ratio {:.2}",
        ours / bare
    );
}

/// The median (upper of the middle two); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `n` units of work split over `tasks` tasks (`f(share)` each);
/// returns the wall time.
pub async fn timed_tasks<F, Fut>(tasks: usize, n: u64, f: F) -> Res<Duration>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Res<()>> + Send + 'static,
{
    let t = std::time::Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| tokio::spawn(f(n / tasks as u64)))
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(t.elapsed())
}

/// The bare side of a one-per-transaction comparison: `n` executions of
/// `sql` with `params` (two texts), split over `tasks` tasks that each hold
/// one pooled connection throughout; returns the wall time.
pub async fn bare_inserts(
    pool: &deadpool_postgres::Pool,
    tasks: usize,
    n: u64,
    sql: &'static str,
    params: [&'static str; 2],
) -> Res<Duration> {
    timed_tasks(tasks, n, |share| {
        let pool = pool.clone();
        async move {
            let c = pool.get().await?;
            let stmt = c.prepare_cached(sql).await?;
            for _ in 0..share {
                c.execute(&stmt, &[&params[0], &params[1]]).await?;
            }
            Ok(())
        }
    })
    .await
}

/// User + system CPU time of this process (`RUSAGE_SELF`), or of its
/// waited-for children (`RUSAGE_CHILDREN`).
fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU time of this process.
pub fn cpu_time() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

/// User + system CPU time of this process's children that were waited for.
pub fn children_cpu_time() -> Duration {
    rusage_cpu(libc::RUSAGE_CHILDREN)
}
