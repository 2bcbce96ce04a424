//! `daemoneye-ipc ping`: connect, make round trips, print the latency.
//!
//! Each round trip is a real task the collector answers quickly: an
//! ENUMERATE_PROCESSES filtered to this ping process's own pid.

use std::time::{Duration, Instant};

use clap::Args;
use daemoneye_ipc::proto::ProcessFilter;
use daemoneye_ipc::{DetectionTask, IpcClient, TaskType};

use crate::{ConfigArgs, Failure};

#[derive(Args)]
pub struct PingCmd {
    #[command(flatten)]
    settings: ConfigArgs,
    /// Unix: also trust a server running as this uid (repeatable). A server
    /// running as our own uid or root is always trusted.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Round trips to make on the one connection.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
}

impl PingCmd {
    pub async fn run(self) -> Result<(), Failure> {
        let config = self.settings.load().map_err(Failure::usage)?.config;
        let transport = config.transport;
        let endpoint = config.endpoint_path.clone();
        let failed = |err| Failure::runtime(format!("ping {endpoint} failed: {err}"));

        let client = IpcClient::builder(config)
            .allow_server_uids(self.allow_uids.iter().copied())
            .build()
            .map_err(Failure::usage)?;
        // The first round trip connects; time the connection on its own.
        let started = Instant::now();
        client.connect_now().await.map_err(failed)?;
        let connect = started.elapsed();
        println!(
            "connected to {} (transport={transport}) in {}",
            client.endpoint(),
            millis(connect)
        );

        let mut round_trips = Vec::with_capacity(self.count as usize);
        for sequence in 1..=self.count {
            let task = DetectionTask {
                task_id: format!("ping-{}-{sequence}", std::process::id()),
                task_type: TaskType::EnumerateProcesses.into(),
                process_filter: Some(ProcessFilter {
                    pids: vec![std::process::id()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            let sent = Instant::now();
            let result = client.send(task).await.map_err(failed)?;
            let elapsed = sent.elapsed();
            if !result.success {
                // The collector's words, escaped (as the logs show them): a
                // peer's text must not move the cursor or recolour the
                // operator's terminal.
                return Err(Failure::runtime(format!(
                    "ping {}: the collector answered with an error: {:?}",
                    client.endpoint(),
                    result.error_message.unwrap_or_default()
                )));
            }
            println!(
                "reply {sequence} from {}: round trip {}",
                client.endpoint(),
                millis(elapsed)
            );
            round_trips.push(elapsed);
        }
        if round_trips.len() > 1 {
            let min = round_trips.iter().min().copied().unwrap_or_default();
            let max = round_trips.iter().max().copied().unwrap_or_default();
            let average = round_trips.iter().sum::<Duration>() / round_trips.len() as u32;
            println!(
                "{} round trips: min {}, avg {}, max {}",
                round_trips.len(),
                millis(min),
                millis(average),
                millis(max)
            );
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1000.0)
}
