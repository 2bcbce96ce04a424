//! `max_frame_bytes` is enforced from the header alone, at exactly the limit,
//! without growing any buffer to what a hostile header claims.

use std::pin::pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use daemoneye_ipc::frame::codec::{FrameCodec, ServerCodec};
use daemoneye_ipc::frame::{
    FrameDecoder, FrameHeader, FrameSettings, HEADER_LEN, encode_frame, encode_message,
};
use daemoneye_ipc::{Crc32Variant, DetectionTask, IpcError};
use futures_util::Stream;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, FramedRead};

const LIMIT: u32 = 4096;

fn settings() -> FrameSettings {
    FrameSettings {
        crc32: Crc32Variant::Ieee,
        max_frame_bytes: LIMIT,
    }
}

fn header_claiming(length: u32) -> [u8; HEADER_LEN] {
    FrameHeader {
        length,
        checksum: 0,
    }
    .to_bytes()
}

#[test]
fn a_body_of_exactly_the_limit_passes_both_ways() {
    let body = vec![0xA5; LIMIT as usize];
    let mut wire = BytesMut::new();
    encode_frame(&body, settings(), &mut wire).expect("exactly the limit encodes");
    let decoded = FrameDecoder::new(settings())
        .decode(&mut wire)
        .expect("exactly the limit decodes");
    assert_eq!(decoded.as_deref(), Some(body.as_slice()));
}

#[test]
fn a_message_of_exactly_the_limit_passes_and_one_byte_more_is_refused() {
    // task_id is field 1: tag (1 byte) + length varint (2 bytes) + the string.
    let at_limit = DetectionTask {
        task_id: "t".repeat(LIMIT as usize - 3),
        ..Default::default()
    };
    assert_eq!(prost::Message::encoded_len(&at_limit), LIMIT as usize);
    let mut wire = BytesMut::new();
    encode_message(&at_limit, settings(), &mut wire).expect("exactly the limit encodes");
    assert_eq!(
        ServerCodec::new(settings()).decode(&mut wire).unwrap(),
        Some(at_limit.clone())
    );

    let over = DetectionTask {
        task_id: format!("{}t", at_limit.task_id),
        ..Default::default()
    };
    let mut wire = BytesMut::new();
    let err = encode_message(&over, settings(), &mut wire).expect_err("one byte over is refused");
    assert!(
        matches!(err, IpcError::MessageTooLarge { length, limit: LIMIT } if length == LIMIT as usize + 1),
        "{err}"
    );
    assert!(
        wire.is_empty(),
        "a refused message leaves nothing half-written"
    );
}

#[test]
fn one_byte_over_the_limit_is_refused_from_the_header_alone() {
    let mut buf = BytesMut::from(&header_claiming(LIMIT + 1)[..]);
    let capacity_before = buf.capacity();
    let err = FrameDecoder::new(settings())
        .decode(&mut buf)
        .expect_err("header alone decides");
    assert!(
        matches!(err, IpcError::FrameTooLarge { length, limit: LIMIT } if length == LIMIT + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("max_frame_bytes = 4096"),
        "the message names the limit: {err}"
    );
    assert_eq!(
        buf.capacity(),
        capacity_before,
        "no room was made for the claimed body"
    );
}

#[test]
fn a_header_at_the_limit_reserves_nothing_for_its_body() {
    let mut decoder = FrameDecoder::new(settings());
    let mut buf = BytesMut::from(&header_claiming(LIMIT)[..]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    assert!(decoder.is_mid_frame());
    assert!(
        buf.capacity() < LIMIT as usize,
        "capacity {} grew toward the claim",
        buf.capacity()
    );
}

/// Through tokio-util's `FramedRead`, as a server reads: a peer announces the
/// largest allowed frame and sends a little of it. The read buffer must stay
/// proportional to what arrived.
#[tokio::test]
async fn framed_read_grows_with_arrived_bytes_not_with_the_claim() {
    const CLAIM: u32 = 1024 * 1024;
    let settings = FrameSettings {
        max_frame_bytes: CLAIM,
        ..FrameSettings::DEFAULT
    };
    let (mut peer, ours) = tokio::io::duplex(64 * 1024);
    peer.write_all(&header_claiming(CLAIM)).await.unwrap();
    peer.write_all(&[7; 1000]).await.unwrap();

    let mut framed = pin!(FramedRead::new(ours, FrameCodec::new(settings)));
    let waker = std::task::Waker::noop();
    let polled = framed.as_mut().poll_next(&mut Context::from_waker(waker));
    assert!(polled.is_pending(), "the frame is incomplete");
    assert_eq!(
        framed.read_buffer().len(),
        1000,
        "header consumed, body bytes buffered"
    );
    assert!(
        framed.read_buffer().capacity() < 64 * 1024,
        "read buffer capacity {} grew toward the claimed {CLAIM}",
        framed.read_buffer().capacity()
    );
}

#[tokio::test]
async fn framed_read_refuses_an_oversize_header_before_any_body_arrives() {
    let (mut peer, ours) = tokio::io::duplex(64 * 1024);
    peer.write_all(&header_claiming(LIMIT + 1)).await.unwrap();

    let mut framed = pin!(FramedRead::new(ours, FrameCodec::new(settings())));
    let waker = std::task::Waker::noop();
    match framed.as_mut().poll_next(&mut Context::from_waker(waker)) {
        Poll::Ready(Some(Err(IpcError::FrameTooLarge { length, limit }))) => {
            assert_eq!((length, limit), (LIMIT + 1, LIMIT));
        }
        other => panic!("expected FrameTooLarge from the header alone, got {other:?}"),
    }
}

#[test]
fn a_zero_length_frame_is_valid() {
    for crc32 in Crc32Variant::ALL {
        let settings = FrameSettings {
            crc32,
            ..settings()
        };
        let mut wire = BytesMut::new();
        encode_message(&DetectionTask::default(), settings, &mut wire).unwrap();
        assert_eq!(
            wire.as_ref(),
            &[0; HEADER_LEN],
            "length 0, and the CRC of nothing is 0"
        );
        assert_eq!(
            ServerCodec::new(settings).decode(&mut wire).unwrap(),
            Some(DetectionTask::default())
        );
    }
}

#[test]
fn a_stream_ending_mid_frame_says_how_much_arrived() {
    let mut wire = BytesMut::new();
    encode_frame(b"twelve bytes", settings(), &mut wire).unwrap();
    wire.truncate(HEADER_LEN + 5);
    let mut decoder = FrameDecoder::new(settings());
    assert_eq!(decoder.decode(&mut wire).unwrap(), None);
    let err = decoder.decode_eof(&mut wire).expect_err("truncated");
    assert!(
        matches!(
            err,
            IpcError::TruncatedFrame {
                received: 13,
                expected: 20
            }
        ),
        "{err}"
    );

    let mut partial_header = BytesMut::from(&[1, 2, 3][..]);
    let err = FrameDecoder::new(settings())
        .decode_eof(&mut partial_header)
        .expect_err("truncated header");
    assert!(
        matches!(
            err,
            IpcError::TruncatedFrame {
                received: 3,
                expected: 8
            }
        ),
        "{err}"
    );

    let mut nothing = BytesMut::new();
    assert_eq!(
        FrameDecoder::new(settings())
            .decode_eof(&mut nothing)
            .unwrap(),
        None
    );
}
