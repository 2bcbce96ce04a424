//! [`SharedEncodings`]: the encoding of a shared result
//! ([`Reply::Shared`](crate::Reply::Shared)), made once for the whole server.
//!
//! A handler that answers many tasks with one `Arc<DetectionResult>` (a
//! cached process table) would otherwise have it encoded and checksummed
//! again for every task. Each reply's frame is instead the task's id,
//! encoded, followed by these bytes, with the checksum combined
//! arithmetically ([`crate::frame::encode_message_with_tail`]).
//!
//! One slot, server-wide: the last shared result answered. It is keyed by a
//! `Weak` reference, so it keeps no result alive (the table is freed when the
//! handler lets it go) while its address cannot be reused by another result
//! meanwhile; the encoding itself is replaced by the next shared result
//! answered. So the cache holds at most one encoding (at most
//! `max_frame_bytes`), however many connections the server has.

use std::sync::{Arc, Weak};

use crate::sync::{Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use crate::frame::FrameSettings;
use crate::proto::DetectionResult;

/// The last shared result's encoding, for every connection of a server.
#[derive(Debug, Default)]
pub(crate) struct SharedEncodings {
    last: Mutex<Option<Encoded>>,
}

#[derive(Debug)]
struct Encoded {
    result: Weak<DetectionResult>,
    settings: FrameSettings,
    bytes: Bytes,
    crc: u32,
}

impl SharedEncodings {
    /// `result`'s encoding and its checksum under `settings.crc32`, made on
    /// first use and shared while the same result keeps answering; `None`
    /// for a result too large for a frame, which the caller refuses.
    pub(crate) fn get(
        &self,
        result: &Arc<DetectionResult>,
        settings: FrameSettings,
    ) -> Option<(Bytes, u32)> {
        if let Some(last) = &*self.lock()
            && std::ptr::eq(last.result.as_ptr(), Arc::as_ptr(result))
            && last.settings == settings
        {
            return Some((last.bytes.clone(), last.crc));
        }
        // Encoded outside the lock: other connections answering other
        // results need not wait for it.
        let length = prost::Message::encoded_len(&**result);
        if length > settings.max_frame_bytes as usize {
            return None;
        }
        let mut bytes = BytesMut::with_capacity(length);
        prost::Message::encode_raw(&**result, &mut bytes);
        let encoded = Encoded {
            result: Arc::downgrade(result),
            settings,
            crc: settings.crc32.checksum(&bytes),
            bytes: bytes.freeze(),
        };
        let answer = (encoded.bytes.clone(), encoded.crc);
        *self.lock() = Some(encoded);
        Some(answer)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Encoded>> {
        // Nothing panics while the lock is held; poisoning is ignored.
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    fn settings() -> FrameSettings {
        FrameSettings::DEFAULT
    }

    #[test]
    fn the_same_result_is_encoded_once_and_a_new_one_afresh() {
        let encodings = SharedEncodings::default();
        let table = Arc::new(sample::detection_result("", 4096));
        let (first, crc) = encodings.get(&table, settings()).unwrap();
        assert_eq!(first, prost::Message::encode_to_vec(&*table));
        assert_eq!(crc, settings().crc32.checksum(&first));
        let (again, _) = encodings.get(&table.clone(), settings()).unwrap();
        assert_eq!(again.as_ptr(), first.as_ptr(), "the same bytes, not a copy");

        let newer = Arc::new(sample::detection_result("", 2048));
        let (fresh, _) = encodings.get(&newer, settings()).unwrap();
        assert_ne!(fresh.as_ptr(), first.as_ptr());
        assert_eq!(fresh, prost::Message::encode_to_vec(&*newer));
    }

    #[test]
    fn the_cache_keeps_no_result_alive() {
        let encodings = SharedEncodings::default();
        let table = Arc::new(sample::detection_result("", 4096));
        encodings.get(&table, settings()).unwrap();
        let watch = Arc::downgrade(&table);
        drop(table);
        assert!(watch.upgrade().is_none(), "the table is freed");
    }

    #[test]
    fn another_checksum_gets_its_own_encoding() {
        let encodings = SharedEncodings::default();
        let table = Arc::new(sample::detection_result("", 1024));
        let ieee = encodings.get(&table, settings()).unwrap().1;
        let castagnoli = FrameSettings {
            crc32: crate::Crc32Variant::Castagnoli,
            ..settings()
        };
        let (bytes, crc) = encodings.get(&table, castagnoli).unwrap();
        assert_eq!(crc, crate::Crc32Variant::Castagnoli.checksum(&bytes));
        assert_ne!(crc, ieee);
    }

    #[test]
    fn a_result_too_large_for_a_frame_has_no_encoding() {
        let encodings = SharedEncodings::default();
        let table = Arc::new(sample::detection_result("", 4096));
        let small = FrameSettings {
            max_frame_bytes: 1024,
            ..settings()
        };
        assert!(encodings.get(&table, small).is_none());
    }
}
