//! prost encode and decode of realistic `DetectionResult`s (process records
//! of about 1 KiB each), framed as on the wire.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use daemoneye_ipc::frame::codec::ClientCodec;
use daemoneye_ipc::frame::{FrameSettings, encode_message};
use daemoneye_ipc::{DetectionResult, sample, view};
use prost::Message;
use tokio_util::codec::Decoder;

const SIZES: [usize; 4] = [64, 1024, 64 * 1024, 1024 * 1024];

fn settings() -> FrameSettings {
    FrameSettings {
        max_frame_bytes: 2 * 1024 * 1024,
        ..FrameSettings::DEFAULT
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("result_encode");
    for size in SIZES {
        let result = sample::detection_result("task-000001", size);
        let mut wire = BytesMut::with_capacity(size + 64);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &result, |b, result| {
            b.iter(|| {
                wire.clear();
                encode_message(black_box(result), settings(), &mut wire).unwrap();
            })
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("result_decode");
    for size in SIZES {
        let mut frame = BytesMut::new();
        encode_message(
            &sample::detection_result("task-000001", size),
            settings(),
            &mut frame,
        )
        .unwrap();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_batched(
                || frame.clone(),
                |mut wire| {
                    ClientCodec::new(settings())
                        .decode(&mut wire)
                        .unwrap()
                        .expect("a whole result decodes")
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Decoding a result's body (and dropping what it decoded, as a caller
/// does): the plain types against the views, whose text fields are slices
/// of the frame.
fn decode_plain_or_view(c: &mut Criterion) {
    let mut group = c.benchmark_group("result_body_decode");
    for size in SIZES {
        let body = Bytes::from(sample::detection_result("task-000001", size).encode_to_vec());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("plain", size), |b| {
            b.iter(|| DetectionResult::decode(black_box(&body[..])).unwrap())
        });
        group.bench_function(BenchmarkId::new("view", size), |b| {
            b.iter(|| view::DetectionResult::decode(black_box(body.clone())).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = encode, decode, decode_plain_or_view
}
criterion_main!(benches);
