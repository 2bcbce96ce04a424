//! Hostile and broken input against a real server process: each bad
//! connection is closed alone, nothing grows toward what a header claims,
//! and slow or partial frames are cut at the read deadline.

mod support;

use std::time::Duration;

use daemoneye_ipc::TransportKind;
use daemoneye_ipc::frame::{FrameHeader, HEADER_LEN};
use support::*;

const READ_TIMEOUT_MS: u64 = 1000;

fn server(transport: TransportKind) -> (Endpoint, ServerProcess) {
    let endpoint = Endpoint::fresh();
    let timeout = READ_TIMEOUT_MS.to_string();
    let server = ServerProcess::start(&endpoint.name, transport, &["--read-timeout-ms", &timeout]);
    (endpoint, server)
}

/// A second connection that must keep working while another misbehaves.
async fn assert_bystander_served(server: &ServerProcess, id: &str) {
    let mut bystander = RawClient::connect(&server.endpoint).await;
    bystander
        .write(&frame_bytes(&quick_task(id)))
        .await
        .unwrap();
    let answer = bystander.read_result(PATIENCE).await;
    assert_eq!(answer.task_id, id);
}

each_backend!(a_checksum_mismatch_closes_only_that_connection);
fn a_checksum_mismatch_closes_only_that_connection(transport: TransportKind) {
    let (_endpoint, mut server) = server(transport);
    block_on(async {
        let mut bystander = RawClient::connect(&server.endpoint).await;
        let mut bad = RawClient::connect(&server.endpoint).await;
        let mut frame = frame_bytes(&quick_task("corrupt"));
        let last = frame.len() - 1;
        frame[last] ^= 0x01;
        bad.write(&frame).await.unwrap();
        assert_eq!(
            bad.read_reply(PATIENCE).await,
            None,
            "closed without an answer"
        );

        bystander
            .write(&frame_bytes(&quick_task("bystander")))
            .await
            .unwrap();
        assert_eq!(bystander.read_result(PATIENCE).await.task_id, "bystander");
        assert_bystander_served(&server, "newcomer").await;
    });
    server.wait_for_log("frame checksum mismatch", 1);
    assert!(
        server.logs().contains("closing connection"),
        "{}",
        server.logs()
    );
}

each_backend!(an_oversize_header_closes_the_connection);
fn an_oversize_header_closes_the_connection(transport: TransportKind) {
    let (_endpoint, mut server) = server(transport);
    block_on(async {
        let mut hostile = RawClient::connect(&server.endpoint).await;
        let header = FrameHeader {
            length: u32::MAX - 1,
            checksum: 0,
        };
        hostile.write(&header.to_bytes()).await.unwrap();
        assert_eq!(hostile.read_reply(PATIENCE).await, None);
        assert_bystander_served(&server, "after").await;
    });
    server.wait_for_log("over the limit max_frame_bytes = 1048576", 1);
}

#[cfg(target_os = "linux")]
each_backend!(headers_claiming_large_bodies_reserve_nothing_for_them);
/// Headers that claim the largest body allowed cost the server nothing
/// until the bytes arrive: with eight connections each holding a frame
/// whose header claims 64 MiB (512 MiB claimed in all), the server's memory
/// stays put while they are open. (Each claim reserves its frame and the
/// largest result, 128 MiB and 16 bytes; the default budget, four such
/// reservations, grants four claims, and the other four wait for room, read
/// no further and hold nothing but what they sent.)
#[cfg(target_os = "linux")]
fn headers_claiming_large_bodies_reserve_nothing_for_them(transport: TransportKind) {
    const CLAIM: u32 = 64 << 20;
    let endpoint = Endpoint::fresh();
    let limit = CLAIM.to_string();
    let mut server =
        ServerProcess::start(&endpoint.name, transport, &["--max-frame-bytes", &limit]);
    block_on(async {
        assert_bystander_served(&server, "warm-up").await;
        let before = rss_bytes(server.pid());
        let counters_before = server.counters();
        let (read_before, pauses_before) = (
            counters_before["bytes_in"],
            counters_before["budget_pauses"],
        );
        let mut claimants = Vec::new();
        for _ in 0..8 {
            let mut claimant = RawClient::connect(&server.endpoint).await;
            let header = FrameHeader {
                length: CLAIM,
                checksum: 0,
            };
            // Header and body start in one write, so the server never sees
            // the header alone: a claimant waiting for its grant reads no
            // further, so bytes arriving after its header would never be
            // counted.
            let mut claim = header.to_bytes().to_vec();
            claim.extend_from_slice(&[0; 100]);
            claimant.write(&claim).await.unwrap();
            claimants.push(claimant);
        }
        // Measured once the server has read every claimant's bytes, and
        // four claimants wait for room while four hold their claims.
        let claimed = 8 * (HEADER_LEN as u64 + 100);
        let pauses = eventually("the claims to be read", PATIENCE, || {
            let counters = server.counters();
            (counters["bytes_in"] >= read_before + claimed
                && counters["budget_pauses"] >= pauses_before + 4)
                .then_some(counters["budget_pauses"] - pauses_before)
        })
        .await;
        assert_eq!(pauses, 4, "four claims granted, four waiting for room");
        let grown = rss_bytes(server.pid()).saturating_sub(before);
        assert!(
            grown < 16 << 20,
            "server RSS grew by {grown} bytes with 512 MiB claimed and 800 bytes sent"
        );
        drop(claimants);
    });
}

each_backend!(an_undecodable_message_closes_the_connection);
fn an_undecodable_message_closes_the_connection(transport: TransportKind) {
    let (_endpoint, mut server) = server(transport);
    block_on(async {
        let mut bad = RawClient::connect(&server.endpoint).await;
        // Field 1 as a length-delimited string claiming 100 bytes, with 1.
        let body = [0x0a, 100, b'x'];
        let header = FrameHeader::for_body(&body, daemoneye_ipc::Crc32Variant::Ieee).unwrap();
        let mut frame = header.to_bytes().to_vec();
        frame.extend_from_slice(&body);
        bad.write(&frame).await.unwrap();
        assert_eq!(bad.read_reply(PATIENCE).await, None);
        assert_bystander_served(&server, "after").await;
    });
    server.wait_for_log("is not a valid DetectionTask", 1);
}

each_backend!(a_zero_length_frame_is_answered);
fn a_zero_length_frame_is_answered(transport: TransportKind) {
    let (_endpoint, server) = server(transport);
    block_on(async {
        let mut client = RawClient::connect(&server.endpoint).await;
        client.write(&[0; HEADER_LEN]).await.unwrap();
        // An all-default task: enumerate every process, with an empty id.
        let answer = client.read_result(PATIENCE).await;
        assert_eq!(answer.task_id, "");
        assert!(answer.success);
        assert!(!answer.processes.is_empty());
    });
}

each_backend!(a_frame_written_one_byte_at_a_time_is_answered);
fn a_frame_written_one_byte_at_a_time_is_answered(transport: TransportKind) {
    let (_endpoint, server) = server(transport);
    block_on(async {
        let mut client = RawClient::connect(&server.endpoint).await;
        for byte in frame_bytes(&quick_task("fragmented")) {
            client.write(&[byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let answer = client.read_result(PATIENCE).await;
        assert_eq!(answer.task_id, "fragmented");
        assert!(answer.success);
    });
}

/// How late a deadline may be kept, by the server's own clock: its timer
/// firing and the line being logged on a loaded machine or under emulation.
const LATE: Duration = Duration::from_millis(250);

/// By the server's own log: from the connection's start ("serving") to its
/// close for `reason`.
fn served_until(server: &ServerProcess, reason: &str) -> Duration {
    server.logged_between("serving", reason)
}

each_backend!(a_trickled_frame_is_cut_at_the_read_deadline);
/// A frame trickled a byte every 100 ms would take seconds: it is cut
/// `read_timeout_ms` after its first byte (which comes as the connection
/// starts), steady progress notwithstanding.
fn a_trickled_frame_is_cut_at_the_read_deadline(transport: TransportKind) {
    let (_endpoint, mut server) = server(transport);
    block_on(async {
        let mut slow = RawClient::connect(&server.endpoint).await;
        let frame = frame_bytes(&quick_task("trickle-trickle-trickle"));
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        for byte in &frame {
            ticks.tick().await;
            if slow.write(&[*byte]).await.is_err() {
                break;
            }
        }
        slow.closed_within(PATIENCE).await;
        assert_bystander_served(&server, "after").await;
    });
    server.wait_for_log("not complete within 1000 ms", 1);
    let cut = served_until(&server, "not complete within 1000 ms");
    let timeout = Duration::from_millis(READ_TIMEOUT_MS);
    assert!(cut >= timeout, "cut {cut:?} after it started");
    assert!(
        cut <= timeout + LATE,
        "cut {cut:?} after it started, read_timeout_ms = {READ_TIMEOUT_MS}"
    );
}

each_backend!(a_partial_header_is_cut_at_the_read_deadline);
fn a_partial_header_is_cut_at_the_read_deadline(transport: TransportKind) {
    let (_endpoint, mut server) = server(transport);
    block_on(async {
        let mut stalled = RawClient::connect(&server.endpoint).await;
        stalled.write(&[1, 0, 0]).await.unwrap();
        stalled.closed_within(PATIENCE).await;
    });
    server.wait_for_log("3 bytes arrived", 1);
    let cut = served_until(&server, "3 bytes arrived");
    let timeout = Duration::from_millis(READ_TIMEOUT_MS);
    assert!(cut >= timeout, "cut {cut:?} after it started");
    assert!(cut <= timeout + LATE, "cut {cut:?} after it started");
}

each_backend!(an_idle_connection_is_closed_after_the_read_timeout);
/// Closed `read_timeout_ms` after its last result went out, by the server's
/// own log.
fn an_idle_connection_is_closed_after_the_read_timeout(transport: TransportKind) {
    let (_endpoint, mut server) = server(transport);
    block_on(async {
        let mut idle = RawClient::connect(&server.endpoint).await;
        idle.write(&frame_bytes(&quick_task("then-nothing")))
            .await
            .unwrap();
        assert_eq!(idle.read_result(PATIENCE).await.task_id, "then-nothing");
        idle.closed_within(PATIENCE).await;
    });
    server.wait_for_log("connection idle for 1000 ms", 1);
    let idle = "connection idle for 1000 ms";
    let timeout = Duration::from_millis(READ_TIMEOUT_MS);
    // The idle clock starts when the write completes, between these two
    // lines: "task received" is logged before it, "results written" a
    // moment after (under emulation, a measurable moment). Each bound is
    // taken from the line on its safe side, so neither needs an allowance
    // for the time a log line takes.
    let since_received = server.logged_between("task received", idle);
    assert!(
        since_received >= timeout,
        "closed {since_received:?} after its task arrived"
    );
    let since_written = server.logged_between("results written", idle);
    assert!(
        since_written <= timeout + LATE,
        "closed {since_written:?} after its result"
    );
}
