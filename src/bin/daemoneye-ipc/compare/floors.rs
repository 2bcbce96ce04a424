//! The two floors: not products, yardsticks. Bare length-prefixed bytes, no
//! CRC, no protobuf, over the plainest sockets: blocking `std` (`raw-std`)
//! and tokio (`raw-tokio`). What the product backends cost above these is
//! the frame codec, the checksum, protobuf and the task plumbing.
//!
//! Request: `u32 LE 8`, then `u64 LE` size wanted. Response: `u32 LE size`,
//! then that many bytes.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of a request.
pub const REQUEST_LEN: usize = 12;

/// The request for a `size`-byte response.
pub fn request(size: usize) -> [u8; REQUEST_LEN] {
    let mut bytes = [0; REQUEST_LEN];
    bytes[..4].copy_from_slice(&8u32.to_le_bytes());
    bytes[4..].copy_from_slice(&(size as u64).to_le_bytes());
    bytes
}

fn requested_size(request: &[u8; REQUEST_LEN]) -> io::Result<usize> {
    let length = u32::from_le_bytes(request[..4].try_into().expect("4 bytes"));
    if length != 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a floor request",
        ));
    }
    usize::try_from(u64::from_le_bytes(
        request[4..].try_into().expect("8 bytes"),
    ))
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "size out of range"))
}

/// Prebuilt responses (length prefix and body in one buffer, so each goes
/// out in one write), by size.
#[derive(Clone)]
pub struct Responses(Arc<HashMap<usize, Vec<u8>>>);

impl Responses {
    pub fn new(sizes: &[usize]) -> Responses {
        let responses = sizes
            .iter()
            .map(|&size| {
                let mut frame = Vec::with_capacity(4 + size);
                frame.extend_from_slice(&(size as u32).to_le_bytes());
                frame.extend((0..size).map(|i| (i % 251) as u8));
                (size, frame)
            })
            .collect();
        Responses(Arc::new(responses))
    }

    fn get(&self, size: usize) -> io::Result<&[u8]> {
        self.0.get(&size).map(Vec::as_slice).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no prebuilt response of {size} bytes"),
            )
        })
    }
}

/// Serves one tokio connection until it closes.
pub async fn serve_tokio<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    responses: Responses,
) -> io::Result<()> {
    let mut request = [0; REQUEST_LEN];
    loop {
        match stream.read_exact(&mut request).await {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        }
        stream
            .write_all(responses.get(requested_size(&request)?)?)
            .await?;
    }
}

/// Reads one response into `buf` (reused), returning its size.
pub async fn read_response_tokio<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut length = [0; 4];
    stream.read_exact(&mut length).await?;
    let length = u32::from_le_bytes(length) as usize;
    buf.resize(length, 0);
    stream.read_exact(buf).await?;
    Ok(length)
}

#[cfg(unix)]
pub mod blocking {
    //! The `raw-std` floor: blocking `std::os::unix::net`, a thread per
    //! connection.
    use std::io::{self, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::{REQUEST_LEN, Responses, requested_size};

    pub fn serve(listener: UnixListener, responses: Responses) -> io::Result<()> {
        for stream in listener.incoming() {
            let stream = stream?;
            let responses = responses.clone();
            std::thread::spawn(move || serve_one(stream, responses));
        }
        Ok(())
    }

    fn serve_one(mut stream: UnixStream, responses: Responses) -> io::Result<()> {
        let mut request = [0; REQUEST_LEN];
        loop {
            match stream.read_exact(&mut request) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(error) => return Err(error),
            }
            stream.write_all(responses.get(requested_size(&request)?)?)?;
        }
    }

    /// Reads one response into `buf` (reused), returning its size.
    pub fn read_response(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<usize> {
        let mut length = [0; 4];
        stream.read_exact(&mut length)?;
        let length = u32::from_le_bytes(length) as usize;
        buf.resize(length, 0);
        stream.read_exact(buf)?;
        Ok(length)
    }
}
