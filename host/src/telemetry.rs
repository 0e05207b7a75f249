//! Logging: `tracing` to stderr, pretty or JSON, at a level from the command line, the config file
//! (`[logging] level`, changeable live) or `RUST_LOG`; lines are queued and written out in batches
//! by a thread of their own.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`. Keep the guard until
/// exit: dropping it writes out the lines still queued (see [`Queued`]).
pub fn init(level: &str, format: LogFormat) -> Option<LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colours only for a person at a terminal: a log file or a journal gets plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let lines = std::sync::Arc::new(Lines::default());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(Queued(lines.clone()))
        .with_ansi(ansi);
    let installed = match format {
        LogFormat::Json => registry.with(fmt.json()).try_init(),
        LogFormat::Pretty => registry.with(fmt).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
        Lines::start_writer(&lines);
        return Some(LogGuard(lines));
    }
    None
}

/// Log lines on their way to stderr. A logging thread copies its line into a shared buffer; a
/// thread of its own writes the buffer out in one system call, [`Queued::GATHER`] after the first
/// line of a batch (it is woken by the line that finds the buffer empty, so at most once per
/// batch, and never while nothing is logged). A request line thus costs a connection thread a
/// copy instead of a write to stderr. Nothing is dropped: past [`Queued::MAX`] queued bytes the
/// logging thread writes the buffer out itself. A line reaches stderr at most about
/// [`Queued::GATHER`] late; a process killed with SIGKILL loses at most the lines of that long.
pub struct Queued(std::sync::Arc<Lines>);

#[derive(Default)]
struct Lines {
    /// What is waiting to be written.
    queued: std::sync::Mutex<Vec<u8>>,
    /// Held while a batch is taken and written, so that batches reach stderr in order.
    writing: std::sync::Mutex<Vec<u8>>,
    /// The writer thread, woken by the first line of a batch; until it runs (or if it could not
    /// be started), each line is written by the thread that logs it.
    writer: OnceLock<std::thread::Thread>,
}

impl Queued {
    const GATHER: std::time::Duration = std::time::Duration::from_millis(20);
    const MAX: usize = 4 << 20;
}

impl Lines {
    /// Starts the thread that writes the queue out (it lives as long as the process's logging).
    fn start_writer(lines: &std::sync::Arc<Lines>) {
        let queue = lines.clone();
        let spawned = std::thread::Builder::new().name("tollgate-log".into()).spawn(move || {
            loop {
                std::thread::park();
                std::thread::sleep(Queued::GATHER);
                queue.write_out();
            }
        });
        match spawned {
            Ok(handle) => {
                let _ = lines.writer.set(handle.thread().clone());
            }
            Err(e) => eprintln!("cannot start the log writer thread ({e}); each log line is written as it comes"),
        }
    }

    /// Writes out what is queued (an error writing to stderr is ignored: there is nowhere to
    /// report it).
    fn write_out(&self) {
        use std::io::Write;
        let mut batch = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            if queued.is_empty() {
                return;
            }
            std::mem::swap(&mut *queued, &mut *batch);
        }
        let _ = std::io::stderr().lock().write_all(&batch);
        batch.clear();
        // A burst's buffer is not kept for ever.
        batch.shrink_to(64 << 10);
    }

    /// Queues one formatted event (the formatter hands over each event in one write).
    fn push(&self, line: &[u8]) {
        let (first, full) = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            let first = queued.is_empty();
            queued.extend_from_slice(line);
            (first, queued.len() >= Queued::MAX)
        };
        match self.writer.get() {
            Some(writer) if !full => {
                if first {
                    writer.unpark();
                }
            }
            _ => self.write_out(),
        }
    }
}

/// One event's writer: a borrow of the queue (no reference count touched per line).
pub struct QueuedLine<'a>(&'a Lines);

impl std::io::Write for QueuedLine<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queued {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> QueuedLine<'a> {
        QueuedLine(&self.0)
    }
}

/// Writes out the queued log lines when dropped (at the end of `main`).
pub struct LogGuard(std::sync::Arc<Lines>);

impl LogGuard {
    /// Writes out the queued lines now (before a message written to stderr directly).
    pub fn flush(&self) {
        self.0.write_out();
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Changes the log filter of the running process (unless `RUST_LOG` set it).
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and wins over the config".into());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    match FILTER.get() {
        Some(h) => h.reload(filter).map_err(|e| e.to_string()),
        None => Err("logging is not initialised".into()),
    }
}
