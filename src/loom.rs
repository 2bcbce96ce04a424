//! The locks connections share, under every interleaving loom explores:
//! the slots ([`Slots`]), the budget ([`SharedBudget`]) and the shared
//! encodings ([`SharedEncodings`]). The rules themselves are checked by the
//! unit tests and the simulation; these check that threads racing through
//! the shared wrappers still see one decision each.
//!
//! ```sh
//! RUSTFLAGS="--cfg daemoneye_loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test --lib --release loom
//! ```

use std::time::{Duration, Instant};

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Notify};
use loom::thread;

use crate::policy::acceptor::{Arrival, Fate};
use crate::policy::encodings::SharedEncodings;
use crate::policy::server::{ConnectionLimits, ServerConnection, ServerEvent};
use crate::proto::{DetectionResult, DetectionTask};
use crate::server::budget::SharedBudget;
use crate::server::slots::Slots;
use crate::sync::Mutex;
use crate::telemetry::Counters;

const WAIT: Duration = Duration::from_millis(100);

/// Whatever order a release and a waiter's timer take the lock in, the
/// waiter hears exactly one fate, never an admission at its deadline, and
/// the slot is held by exactly whoever was told so.
#[test]
fn a_waiter_hears_one_fate_whatever_races_its_deadline() {
    for release_early in [false, true] {
        loom::model(move || {
            let t0 = Instant::now();
            let slots = Arc::new(Slots::new(1, None, WAIT));
            let (first, arrival) = slots.arrive(None, |_, _| true, || t0);
            assert_eq!(arrival, Arrival::Admitted);
            let heard = Arc::new(Mutex::new(Vec::new()));
            let tell = heard.clone();
            let (second, arrival) = slots.arrive(
                None,
                move |_, fate| {
                    tell.lock().unwrap().push(fate);
                    true
                },
                || t0,
            );
            let Arrival::Waiting { deadline } = arrival else {
                panic!("{arrival:?}")
            };
            let leaving = {
                let slots = slots.clone();
                let at = if release_early {
                    deadline - Duration::from_millis(1)
                } else {
                    deadline
                };
                thread::spawn(move || slots.release(first, || at))
            };
            slots.handle_timeout(|| deadline);
            leaving.join().unwrap();
            let heard = heard.lock().unwrap().clone();
            match heard[..] {
                [Fate::Admitted] => {
                    assert!(release_early, "admitted at its deadline");
                    assert_eq!(slots.served(), 1);
                    slots.release(second, || deadline);
                }
                [Fate::Expired] => {}
                ref other => panic!("heard {other:?}"),
            }
            assert_eq!(slots.served(), 0, "no slot left held");
        });
    }
}

/// A waiter withdrawing (shutdown) while a slot frees: one fate, and a slot
/// handed to a waiter that is gone comes back.
#[test]
fn a_withdrawal_racing_a_release_leaves_no_slot_behind() {
    loom::model(|| {
        let t0 = Instant::now();
        let slots = Arc::new(Slots::new(1, None, WAIT));
        let (first, _) = slots.arrive(None, |_, _| true, || t0);
        let listening = Arc::new(AtomicBool::new(true));
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (tell, ear) = (heard.clone(), listening.clone());
        let (second, _) = slots.arrive(
            None,
            move |_, fate| {
                // A waiter that has gone hears nothing.
                let there = ear.load(Ordering::SeqCst);
                if there {
                    tell.lock().unwrap().push(fate);
                }
                there
            },
            || t0,
        );
        let leaving = {
            let slots = slots.clone();
            thread::spawn(move || slots.release(first, || t0))
        };
        listening.store(false, Ordering::SeqCst);
        slots.withdraw(second, || t0);
        leaving.join().unwrap();
        let heard = heard.lock().unwrap().clone();
        if heard == [Fate::Admitted] {
            slots.release(second, || t0);
        } else {
            assert!(heard.is_empty(), "heard {heard:?}");
        }
        assert_eq!(slots.served(), 0);
    });
}

const LIMITS: ConnectionLimits = ConnectionLimits {
    settings: crate::frame::FrameSettings {
        max_frame_bytes: 1024,
        crc32: crate::Crc32Variant::Ieee,
    },
    read_timeout: Duration::from_secs(30),
    write_timeout: Duration::from_secs(10),
    task_timeout: Duration::from_secs(60),
    max_in_flight: 4,
};

fn frame(id: &str) -> Vec<u8> {
    let task = DetectionTask {
        task_id: id.to_owned(),
        ..Default::default()
    };
    let mut wire = bytes::BytesMut::new();
    crate::frame::encode_message(&task, LIMITS.settings, &mut wire).unwrap();
    wire.to_vec()
}

/// One connection's whole life against the shared budget: a task read,
/// answered with a large result, written, the connection gone. It parks
/// while the budget is full, until its wake-up.
fn serve_one_task(budget: &SharedBudget, id: &str) {
    let now = Instant::now();
    let woken = Arc::new(Notify::new());
    let wake = {
        let woken = woken.clone();
        Box::new(move || woken.notify())
    };
    let counters = Counters::default();
    let mut core = ServerConnection::new(LIMITS, Default::default(), Default::default(), now);
    let holder = budget.join(wake);
    let bytes = frame(id);
    core.read_buffer().extend_from_slice(&bytes);
    core.on_read(bytes.len(), now);
    let ticket = loop {
        budget.settle(holder, &mut core, &counters, now);
        if let Some(ServerEvent::StartTask { ticket, .. }) = core.poll_event() {
            break ticket;
        }
        woken.wait();
    };
    assert!(budget.held() <= LIMITS.largest_reservation());
    let result = DetectionResult {
        task_id: id.to_owned(),
        error_message: Some("x".repeat(1000)),
        ..Default::default()
    };
    core.task_finished(ticket, Ok(result.into()), now);
    budget.settle(holder, &mut core, &counters, now);
    let written = core.pending_output().len();
    core.on_written(written, now);
    budget.settle(holder, &mut core, &counters, now);
    budget.leave(holder, core.release_all());
}

/// Two connections whose tasks cannot both be reserved for: whichever
/// reserves first, the other is woken when it is written, both are served,
/// and the budget is never exceeded nor left holding anything.
#[test]
fn two_connections_share_a_budget_with_room_for_one_task() {
    loom::model(|| {
        let budget = Arc::new(SharedBudget::new(LIMITS.largest_reservation()));
        let other = {
            let budget = budget.clone();
            thread::spawn(move || serve_one_task(&budget, "a"))
        };
        serve_one_task(&budget, "b");
        other.join().unwrap();
        assert_eq!(budget.held(), 0);
    });
}

/// Two connections answering with one shared result at once each get its
/// whole encoding.
#[test]
fn shared_encodings_are_whole_whichever_connection_makes_them() {
    loom::model(|| {
        let encodings = Arc::new(SharedEncodings::default());
        let result = std::sync::Arc::new(crate::sample::detection_result("", 512));
        let expected = prost::Message::encode_to_vec(&*result);
        let other = {
            let (encodings, result, expected) =
                (encodings.clone(), result.clone(), expected.clone());
            thread::spawn(move || {
                let (bytes, _) = encodings.get(&result, LIMITS.settings).unwrap();
                assert_eq!(bytes, expected);
            })
        };
        let (bytes, crc) = encodings.get(&result, LIMITS.settings).unwrap();
        assert_eq!(bytes, expected);
        assert_eq!(crc, LIMITS.settings.crc32.checksum(&expected));
        other.join().unwrap();
    });
}
