//! Results as views: the same messages as [`crate::proto`]'s
//! `DetectionResult`, `ProcessRecord` and `HashResult`, decoded without
//! copying their text. An opt-in beside the plain types, for agents that
//! read large results ([`IpcClient::send_view`](crate::IpcClient::send_view)).
//!
//! Every `string` field of the schema is a [`Bytes`] here: a slice of the
//! frame the result arrived in, so decoding allocates nothing per string and
//! copies no text. A 64 KiB result of process records decodes about twice as
//! fast this way (`cargo bench --bench message`, `result_body_decode`;
//! figures in `docs/performance.md`). The wire format is the same: the views are
//! generated from the same `.proto` files, with `string` read as `bytes`,
//! which protobuf encodes identically.
//!
//! Two things differ from the plain types:
//!
//! * **UTF-8 is not checked** when decoding; [`text`] checks a field when
//!   it is read, so text the peer got wrong is an error at that point, for
//!   that field.
//! * **A view keeps its frame alive.** Every field shares the buffer the
//!   frame was read into, which is freed when the last view (or field)
//!   taken from it is dropped. Copy out what must outlive the result, rather
//!   than keeping a small field of a large result.
//!
//! ```
//! use daemoneye_ipc::view::{self, DetectionResult};
//! use prost::Message;
//!
//! // The bytes of a plain result, as they would arrive in a frame.
//! let plain = daemoneye_ipc::DetectionResult {
//!     task_id: "scan-1".into(),
//!     success: true,
//!     ..Default::default()
//! };
//! let body = bytes::Bytes::from(plain.encode_to_vec());
//!
//! let result = DetectionResult::decode(body).unwrap();
//! assert_eq!(view::text(&result.task_id).unwrap(), "scan-1");
//! ```

#![allow(missing_docs)] // Generated code: the .proto files carry the documentation.

pub use bytes::Bytes;

include!(concat!(env!("OUT_DIR"), "/daemoneye.ipc_view.rs"));

/// A text field of a view as `&str`, or the error that says why it is not
/// text (the peer sent bytes that are not UTF-8 where the schema says
/// `string`).
pub fn text(field: &Bytes) -> Result<&str, std::str::Utf8Error> {
    std::str::from_utf8(field)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::sample;

    /// A view decodes the bytes a plain result encodes to, field for field.
    #[test]
    fn a_view_reads_what_a_plain_result_wrote() {
        let plain = sample::detection_result("view-1", 64 * 1024);
        let body = Bytes::from(plain.encode_to_vec());
        let view = DetectionResult::decode(body.clone()).unwrap();

        assert_eq!(text(&view.task_id).unwrap(), plain.task_id);
        assert_eq!(view.success, plain.success);
        assert_eq!(view.processes.len(), plain.processes.len());
        for (seen, sent) in view.processes.iter().zip(&plain.processes) {
            assert_eq!(seen.pid, sent.pid);
            assert_eq!(text(&seen.name).unwrap(), sent.name);
            assert_eq!(
                seen.executable_path.as_ref().map(|p| text(p).unwrap()),
                sent.executable_path.as_deref()
            );
            let arguments: Vec<&str> = seen.command_line.iter().map(|a| text(a).unwrap()).collect();
            assert_eq!(arguments, sent.command_line);
            assert_eq!(seen.memory_usage, sent.memory_usage);
        }
        // And encodes back to the same bytes.
        assert_eq!(view.encode_to_vec(), body);
    }

    /// Text fields are slices of the frame, not copies.
    #[test]
    fn text_fields_share_the_frame() {
        let plain = sample::detection_result("view-2", 4 * 1024);
        let body = Bytes::from(plain.encode_to_vec());
        let view = DetectionResult::decode(body.clone()).unwrap();
        let frame = body.as_ptr_range();
        let name = view.processes[0].name.as_ptr();
        assert!(frame.contains(&name), "the name points into the frame");
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_when_read() {
        let view = ProcessRecord {
            name: Bytes::from_static(b"\xff\xfe"),
            ..Default::default()
        };
        let error = text(&view.name).unwrap_err();
        assert!(error.to_string().contains("invalid utf-8"), "{error}");
    }
}
