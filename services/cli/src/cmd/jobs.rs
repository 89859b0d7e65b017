//! `gigapath jobs list|retry|cancel`: the operators' view of the ingest job queue (crate
//! `gigapath-pipeline`, [`JobQueue`]). Opens only the catalog, so it works beside a running
//! `ingest`, `worker` or `serve`.

use anyhow::Result;
use clap::{Args, Subcommand};
use gigapath_pipeline::queue::{Job, JobQueue, JobState};
use gigapath_store::time::{now_ms, utc};
use serde::Serialize;

use crate::cmd::ingest::DataArgs;

#[derive(Subcommand)]
pub enum JobsCommand {
    /// List jobs (oldest first): state, slide id, attempts, last error, worker and lease, times.
    List(ListArgs),
    /// Queue failed (parked) or cancelled jobs again, with their attempts reset.
    Retry(IdsArgs),
    /// Cancel queued or running jobs. A worker running one stops at its next lease renewal
    /// (or before it writes the slide's point) and records nothing.
    Cancel(IdsArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Only jobs in this state.
    #[arg(long, value_parser = ["queued", "running", "done", "failed", "cancelled"])]
    pub state: Option<String>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Print one JSON array of jobs.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct IdsArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Job ids (from `gigapath jobs list`).
    #[arg(required = true)]
    pub ids: Vec<i64>,
    /// Print one JSON array: per id, the job after the change or the reason it was refused.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: JobsCommand) -> Result<()> {
    match command {
        JobsCommand::List(a) => list(a),
        JobsCommand::Retry(a) => change(a, "retried", |q, id| Ok(q.retry(id)?)),
        JobsCommand::Cancel(a) => change(a, "cancelled", |q, id| Ok(q.cancel(id)?)),
    }
}

fn list(args: ListArgs) -> Result<()> {
    let queue = JobQueue::open(&args.data.load()?)?;
    let state = args
        .state
        .as_deref()
        .map(str::parse::<JobState>)
        .transpose()?;
    let jobs = queue.list(state, args.limit)?;
    if args.json {
        println!("{}", serde_json::to_string(&jobs)?);
        return Ok(());
    }
    if jobs.is_empty() {
        println!(
            "no jobs{}",
            state.map(|s| format!(" {s}")).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:>6}  {:<9}  {:<20}  {:>8}  {:<19}  {:<19}  {:<22}  error",
        "id", "state", "slide", "attempts", "first attempt", "last attempt", "worker / lease"
    );
    let now = now_ms();
    for j in &jobs {
        println!(
            "{:>6}  {:<9}  {:<20}  {:>8}  {:<19}  {:<19}  {:<22}  {}",
            j.id,
            j.state.as_str(),
            j.subject,
            attempts(j),
            j.first_attempt_at_ms.map(utc).unwrap_or_else(|| "-".into()),
            j.last_attempt_at_ms.map(utc).unwrap_or_else(|| "-".into()),
            worker_and_lease(j, now),
            j.error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// One id's outcome in `retry` / `cancel --json`.
#[derive(Serialize)]
struct Outcome {
    id: i64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Applies `op` to every id; refused ids are reported one by one and make the command fail.
fn change(args: IdsArgs, done: &str, op: impl Fn(&JobQueue, i64) -> Result<Job>) -> Result<()> {
    let queue = JobQueue::open(&args.data.load()?)?;
    let mut outcomes = Vec::new();
    for &id in &args.ids {
        outcomes.push(match op(&queue, id) {
            Ok(job) => Outcome {
                id,
                ok: true,
                job: Some(job),
                error: None,
            },
            Err(e) => Outcome {
                id,
                ok: false,
                job: None,
                error: Some(format!("{e:#}")),
            },
        });
    }
    if args.json {
        println!("{}", serde_json::to_string(&outcomes)?);
    } else {
        for o in &outcomes {
            match (&o.job, &o.error) {
                (Some(j), _) => println!(
                    "job {} (slide {}): {done}, now {}",
                    j.id, j.subject, j.state
                ),
                (None, Some(e)) => println!("job {}: not {done}: {e}", o.id),
                (None, None) => {}
            }
        }
    }
    let refused = outcomes.iter().filter(|o| !o.ok).count();
    if refused > 0 {
        anyhow::bail!("{refused} of {} job(s) not {done}", outcomes.len());
    }
    Ok(())
}

fn attempts(j: &Job) -> String {
    if j.deferrals > 0 {
        format!("{}+{}d", j.attempts, j.deferrals)
    } else {
        j.attempts.to_string()
    }
}

fn worker_and_lease(j: &Job, now: i64) -> String {
    let worker = j.worker.as_deref().unwrap_or("-");
    match (j.state, j.lease_expires_at_ms) {
        (JobState::Running, Some(t)) if t >= now => {
            format!("{worker} ({} s left)", (t - now) / 1000)
        }
        (JobState::Running, Some(t)) => format!("{worker} (expired {} s ago)", (now - t) / 1000),
        _ => worker.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn epoch_ms_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_300_454_000), "2026-12-03 12:20:54");
    }
}
