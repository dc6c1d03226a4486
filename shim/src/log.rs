//! Log lines on stderr, which the long-running shim points at the bundle's `log`
//! FIFO (containerd and keeld copy it into their own logs), in logrus's text form.

/// Writes one log line: `level=… msg="…"`.
pub fn line(level: &str, msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let msg = msg.to_string();
    let _ = writeln!(
        std::io::stderr().lock(),
        "level={level} msg={:?} runtime=io.containerd.keel.v1",
        msg
    );
}

macro_rules! log_warn {
    ($($t:tt)*) => { $crate::log::line("warning", format_args!($($t)*)) };
}
macro_rules! log_info {
    ($($t:tt)*) => { $crate::log::line("info", format_args!($($t)*)) };
}
pub(crate) use {log_info, log_warn};
