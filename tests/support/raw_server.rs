//! A server that speaks raw bytes (Unix socket or named pipe), for tests
//! where the collector misbehaves or stops reading.

use bytes::BytesMut;
#[cfg(windows)]
use daemoneye_ipc::endpoint::PIPE_SDDL;
use daemoneye_ipc::frame::{FrameSettings, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Endpoint, PATIENCE};

/// A server that speaks raw bytes: Unix socket or named pipe, secured as far
/// as the client's checks need (our own account owns it; on Windows, the
/// real server's security descriptor).
pub struct RawServer {
    #[cfg(unix)]
    listener: tokio::net::UnixListener,
    #[cfg(windows)]
    name: String,
    #[cfg(windows)]
    waiting: Option<tokio::net::windows::named_pipe::NamedPipeServer>,
}

pub struct RawConnection {
    #[cfg(unix)]
    stream: tokio::net::UnixStream,
    #[cfg(windows)]
    stream: tokio::net::windows::named_pipe::NamedPipeServer,
    buf: BytesMut,
}

impl RawServer {
    pub async fn bind(endpoint: &Endpoint) -> RawServer {
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            let dir = endpoint.path().parent().unwrap();
            std::fs::DirBuilder::new().mode(0o700).create(dir).unwrap();
            RawServer {
                listener: tokio::net::UnixListener::bind(endpoint.path()).unwrap(),
            }
        }
        #[cfg(windows)]
        {
            let waiting = super::described_pipe::create(&endpoint.name, PIPE_SDDL, true);
            RawServer {
                name: endpoint.name.clone(),
                waiting: Some(waiting),
            }
        }
    }

    pub async fn accept(&mut self) -> RawConnection {
        #[cfg(unix)]
        let stream = self.listener.accept().await.unwrap().0;
        #[cfg(windows)]
        let stream = {
            let waiting = self.waiting.take().unwrap();
            waiting.connect().await.unwrap();
            self.waiting = Some(super::described_pipe::create(&self.name, PIPE_SDDL, false));
            waiting
        };
        RawConnection {
            stream,
            buf: BytesMut::new(),
        }
    }
}

#[cfg(unix)]
impl Drop for RawServer {
    fn drop(&mut self) {
        if let Ok(address) = self.listener.local_addr()
            && let Some(path) = address.as_pathname()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl RawConnection {
    /// Reads `count` task frames; returns their ids.
    pub async fn read_tasks(&mut self, count: usize) -> Vec<String> {
        let mut codec = daemoneye_ipc::frame::codec::ServerCodec::new(FrameSettings::DEFAULT);
        let mut ids = Vec::new();
        while ids.len() < count {
            use tokio_util::codec::Decoder;
            if let Some(task) = codec.decode(&mut self.buf).unwrap() {
                ids.push(task.task_id);
                continue;
            }
            let read = tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("the client's tasks arrive")
                .unwrap();
            assert!(read > 0, "the client closed before sending");
        }
        assert!(self.buf.len() < HEADER_LEN, "nothing more than the tasks");
        ids
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Whether the client ends the connection (end of stream, or a reset)
    /// within [`PATIENCE`], discarding anything else it sends meanwhile.
    pub async fn ends(&mut self) -> bool {
        let end = async {
            loop {
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => self.buf.clear(),
                }
            }
        };
        tokio::time::timeout(PATIENCE, end).await.is_ok()
    }
}
