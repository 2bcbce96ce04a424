//! The sans-I/O frame core: CRC-32 variants, frame encode and decode, per
//! payload size. No sockets, no protobuf.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use daemoneye_ipc::frame::{Crc32Variant, FrameDecoder, FrameSettings, encode_frame};

const SIZES: [usize; 4] = [64, 1024, 64 * 1024, 1024 * 1024];

fn settings(crc32: Crc32Variant) -> FrameSettings {
    FrameSettings {
        crc32,
        max_frame_bytes: 2 * 1024 * 1024,
    }
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

fn checksum(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32");
    for size in SIZES {
        let body = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        for variant in Crc32Variant::ALL {
            group.bench_with_input(BenchmarkId::new(variant.name(), size), &body, |b, body| {
                b.iter(|| variant.checksum(black_box(body)))
            });
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    for size in SIZES {
        let body = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        for variant in Crc32Variant::ALL {
            let mut wire = BytesMut::with_capacity(size + 8);
            group.bench_with_input(BenchmarkId::new(variant.name(), size), &body, |b, body| {
                b.iter(|| {
                    wire.clear();
                    encode_frame(black_box(body), settings(variant), &mut wire).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_decode");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        for variant in Crc32Variant::ALL {
            let mut frame = BytesMut::new();
            encode_frame(&payload(size), settings(variant), &mut frame).unwrap();
            group.bench_function(BenchmarkId::new(variant.name(), size), |b| {
                b.iter_batched(
                    || frame.clone(),
                    |mut wire| {
                        FrameDecoder::new(settings(variant))
                            .decode(&mut wire)
                            .unwrap()
                            .expect("a whole frame decodes")
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = checksum, encode, decode
}
criterion_main!(benches);
