//! Windows pipe names. Pure string handling, so it is tested on every
//! platform even though only Windows binds pipes.
//!
//! `interprocess`'s namespaced names prepend `\\.\pipe\` to whatever they are
//! given, so `\\.\pipe\x` would become `\\.\pipe\\\.\pipe\x`; the Tokio
//! backend takes the full name verbatim. Normalising here, once, makes
//! `daemoneye\procmond` and `\\.\pipe\daemoneye\procmond` reach the same pipe
//! on every backend.

use crate::error::IpcError;

/// The prefix of every local named pipe.
pub const LOCAL_PIPE_PREFIX: &str = r"\\.\pipe\";

/// Returns the full local pipe name (`\\.\pipe\NAME`) for `NAME` or
/// `\\.\pipe\NAME` (prefix matched case-insensitively). Anything else that starts with two separators (another
/// host's pipe, a device or file path) is refused: this transport is local
/// only.
///
/// ```
/// use daemoneye_ipc::endpoint::pipe_name::normalize;
/// assert_eq!(normalize(r"daemoneye\procmond")?, r"\\.\pipe\daemoneye\procmond");
/// assert_eq!(normalize(r"\\.\PIPE\daemoneye\procmond")?, r"\\.\pipe\daemoneye\procmond");
/// assert!(normalize(r"\\fileserver\pipe\procmond").is_err());
/// # Ok::<(), daemoneye_ipc::IpcError>(())
/// ```
pub fn normalize(name: &str) -> Result<String, IpcError> {
    let refuse = || IpcError::NotALocalPipe {
        name: name.to_owned(),
    };
    // Only the prefix is interpreted; the rest is the pipe's own name.
    let trimmed = name.trim();
    let rest = match trimmed.get(..LOCAL_PIPE_PREFIX.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(LOCAL_PIPE_PREFIX) => {
            &trimmed[LOCAL_PIPE_PREFIX.len()..]
        }
        _ if trimmed.starts_with(r"\\") => return Err(refuse()),
        _ => trimmed,
    };
    // Win32 folds "." and ".." in \\.\ paths, so "..\UNC\host\pipe\x"
    // would leave the local pipe namespace for another machine's.
    let dot_segment = rest
        .split(['\\', '/'])
        .any(|segment| segment == "." || segment == "..");
    if rest.is_empty() || rest.contains('\0') || dot_segment {
        return Err(refuse());
    }
    Ok(format!("{LOCAL_PIPE_PREFIX}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_and_without_the_prefix_name_the_same_pipe() {
        let expected = r"\\.\pipe\daemoneye\procmond";
        for given in [
            r"daemoneye\procmond",
            r"\\.\pipe\daemoneye\procmond",
            r"\\.\Pipe\daemoneye\procmond",
            " daemoneye\\procmond ",
        ] {
            assert_eq!(normalize(given).unwrap(), expected, "{given}");
        }
    }

    #[test]
    fn remote_and_non_pipe_paths_are_refused() {
        for given in [
            r"\\server\pipe\procmond",
            r"\\?\C:\x",
            r"\\.\pipe\",
            "",
            "   ",
            r"..\UNC\server\pipe\x",
            r"\\.\pipe\a\..\..\UNC\server\pipe\x",
            "a/../b",
            r".\procmond",
        ] {
            let err = normalize(given).expect_err(given);
            assert!(err.to_string().contains("not a local named pipe"), "{err}");
        }
    }
}
