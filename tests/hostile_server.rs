//! The agent decodes whatever the collector sends. Here the collector is a
//! raw socket that misbehaves: a bad checksum, an oversize header, a result
//! for a task never sent, the same result twice, a valid frame of garbage, a
//! frame cut half-way, silence. Each gives the waiting callers a clear
//! error, never a wrong answer, never a panic or a hang, and the same client
//! works again against a good server.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use daemoneye_ipc::frame::{FrameHeader, FrameSettings, encode_message};
use daemoneye_ipc::{
    Crc32Variant, DetectionResult, DetectionTask, IpcClient, IpcConfig, IpcError, IpcServer,
    TransportKind,
};
use support::raw_server::RawServer;
use support::*;

/// How a hostile server answers the tasks it reads.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    BadChecksum,
    OversizeHeader,
    ResultForATaskNeverSent,
    SameResultTwice,
    GarbageProtobuf,
    FrameCutHalfWay,
    NothingAtAll,
}

/// What a caller must be told, in words it can act on.
fn expected(misbehaviour: Misbehaviour) -> &'static str {
    match misbehaviour {
        Misbehaviour::BadChecksum => "frame checksum mismatch",
        Misbehaviour::OversizeHeader => "over the limit max_frame_bytes",
        Misbehaviour::ResultForATaskNeverSent | Misbehaviour::SameResultTwice => {
            "which this connection is not waiting for"
        }
        Misbehaviour::GarbageProtobuf => "is not a valid DetectionResult",
        Misbehaviour::FrameCutHalfWay => "connection closed in the middle of a frame",
        Misbehaviour::NothingAtAll => "within 500 ms (read_timeout_ms)",
    }
}

fn frame_of(result: &DetectionResult) -> Vec<u8> {
    let mut wire = BytesMut::new();
    encode_message(result, FrameSettings::DEFAULT, &mut wire).unwrap();
    wire.to_vec()
}

fn answer(task_id: &str) -> DetectionResult {
    DetectionResult {
        task_id: task_id.to_owned(),
        success: true,
        ..Default::default()
    }
}

/// The bytes the hostile server sends once it has read the tasks `ids`.
fn misbehave(misbehaviour: Misbehaviour, ids: &[String]) -> Vec<u8> {
    match misbehaviour {
        Misbehaviour::BadChecksum => {
            let mut frame = frame_of(&answer(&ids[0]));
            *frame.last_mut().unwrap() ^= 1;
            frame
        }
        Misbehaviour::OversizeHeader => FrameHeader {
            length: u32::MAX,
            checksum: 0,
        }
        .to_bytes()
        .to_vec(),
        Misbehaviour::ResultForATaskNeverSent => frame_of(&answer("never-sent")),
        Misbehaviour::SameResultTwice => {
            [frame_of(&answer(&ids[0])), frame_of(&answer(&ids[0]))].concat()
        }
        Misbehaviour::GarbageProtobuf => {
            let body = [0x0a, 200, b'x'];
            let header = FrameHeader::for_body(&body, Crc32Variant::Ieee).unwrap();
            [header.to_bytes().to_vec(), body.to_vec()].concat()
        }
        Misbehaviour::FrameCutHalfWay => {
            let frame = frame_of(&answer(&ids[0]));
            frame[..frame.len() / 2].to_vec()
        }
        Misbehaviour::NothingAtAll => Vec::new(),
    }
}

each_backend!(async a_hostile_server_gets_clear_errors_and_no_wrong_answers);
async fn a_hostile_server_gets_clear_errors_and_no_wrong_answers(transport: TransportKind) {
    use Misbehaviour::*;
    for misbehaviour in [
        BadChecksum,
        OversizeHeader,
        ResultForATaskNeverSent,
        SameResultTwice,
        GarbageProtobuf,
        FrameCutHalfWay,
        NothingAtAll,
    ] {
        let endpoint = Endpoint::fresh();
        let config = IpcConfig {
            transport,
            endpoint_path: endpoint.name.clone(),
            read_timeout_ms: 500,
            ..IpcConfig::default()
        };
        let client = IpcClient::new(config.clone()).unwrap();
        let case = format!("{transport} client, {misbehaviour:?}");

        let mut hostile = RawServer::bind(&endpoint).await;
        let callers = ["first", "second"].map(|id| {
            let client = client.clone();
            tokio::spawn(async move {
                let task = DetectionTask {
                    task_id: id.to_owned(),
                    ..Default::default()
                };
                client.send(task).await
            })
        });
        let mut connection = hostile.accept().await;
        let ids = connection.read_tasks(2).await;
        connection.write(&misbehave(misbehaviour, &ids)).await;
        // Kept open, except when the point is closing it: the client must not
        // wait on a connection it cannot trust any more.
        let mut kept_open = (!matches!(misbehaviour, FrameCutHalfWay)).then_some(connection);

        for caller in callers {
            match tokio::time::timeout(PATIENCE, caller).await {
                Err(_) => panic!("{case}: a caller hangs"),
                Ok(joined) => match joined.unwrap() {
                    // Only the task answered before the second copy of its
                    // answer may have an answer: its own.
                    Ok(result) => {
                        assert!(
                            matches!(misbehaviour, SameResultTwice),
                            "{case}: {result:?}"
                        );
                        assert_eq!(result.task_id, ids[0], "{case}: an answer for another task");
                    }
                    Err(
                        error
                        @ (IpcError::ConnectionLost { .. } | IpcError::ResponseTimeout { .. }),
                    ) => {
                        let message = error.to_string();
                        assert!(
                            message.contains(expected(misbehaviour)),
                            "{case}: {message}"
                        );
                    }
                    Err(other) => panic!("{case}: {other:?}"),
                },
            }
        }
        // Having stopped trusting the connection, the client ends it at
        // once, not on its next send: the server frees what it held.
        if let Some(connection) = &mut kept_open
            && !matches!(misbehaviour, NothingAtAll)
        {
            assert!(
                connection.ends().await,
                "{case}: the client keeps the connection open"
            );
        }
        drop(kept_open);
        drop(hostile);

        // A good server on the same endpoint: the same client carries on.
        let good = IpcServer::bind(config.clone(), |task: DetectionTask| async move {
            answer(&task.task_id)
        })
        .await
        .unwrap_or_else(|error| panic!("{case}: the good server cannot bind: {error}"));
        let after = tokio::time::timeout(
            PATIENCE,
            client.send(DetectionTask {
                task_id: "after".into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{case}: the next send hangs"))
        .unwrap_or_else(|error| panic!("{case}: the next send fails: {error}"));
        assert_eq!(after.task_id, "after", "{case}");
        good.shutdown(Duration::from_secs(5)).await;
    }
}

each_backend!(async a_result_that_does_not_decode_fails_only_its_task);
/// A result whose id and framing are sound but whose fields are not (here a
/// process record that is not a message) fails its own task with an error
/// saying so; the connection carries on, and the next task on it is answered.
async fn a_result_that_does_not_decode_fails_only_its_task(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        transport,
        endpoint_path: endpoint.name.clone(),
        read_timeout_ms: 5_000,
        ..IpcConfig::default()
    };
    let client = IpcClient::new(config).unwrap();
    let mut hostile = RawServer::bind(&endpoint).await;
    let send = |id: &'static str| {
        let client = client.clone();
        tokio::spawn(async move {
            let task = DetectionTask {
                task_id: id.to_owned(),
                ..Default::default()
            };
            client.send(task).await
        })
    };

    let broken = send("broken");
    let mut connection = hostile.accept().await;
    let ids = connection.read_tasks(1).await;
    assert_eq!(ids, ["broken"]);
    // task_id = "broken", then field 4 (processes) holding 0xff: not a
    // ProcessRecord.
    let mut body = vec![0x0a, 6];
    body.extend_from_slice(b"broken");
    body.extend_from_slice(&[0x22, 1, 0xff]);
    let header = FrameHeader::for_body(&body, Crc32Variant::Ieee).unwrap();
    connection
        .write(&[header.to_bytes().to_vec(), body].concat())
        .await;
    let error = tokio::time::timeout(PATIENCE, broken)
        .await
        .expect("the caller hangs")
        .unwrap()
        .expect_err("a result that does not decode is not an answer");
    assert!(
        matches!(error, IpcError::MalformedResult { ref task_id, .. } if task_id == "broken")
            && error.to_string().contains("is not a valid DetectionResult"),
        "{transport}: {error}"
    );

    let next = send("next");
    let ids = connection.read_tasks(1).await;
    assert_eq!(
        ids,
        ["next"],
        "{transport}: the same connection carries the next task"
    );
    connection.write(&frame_of(&answer("next"))).await;
    let result = tokio::time::timeout(PATIENCE, next)
        .await
        .expect("the caller hangs")
        .unwrap()
        .unwrap();
    assert_eq!(result.task_id, "next");
}
