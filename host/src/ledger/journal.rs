//! The charge journal: an append-only file that makes a charge or refund durable with one `write`
//! on the caller's thread, so the hot path never waits for a database commit or wakes the writer.
//! The database catches up in batches behind it; at start-up, whatever the database had not yet
//! committed is replayed from the journal (a ledger row cannot be applied twice, so replaying a
//! committed one changes nothing), and segments whose records are all committed are deleted.
//!
//! A call's request-log row (written when it is settled) is journaled too: it is what usage webhooks
//! deliver, so a settled call's event survives a kill as its charge does. Replayed rows are skipped
//! by their request id.
//!
//! A written record survives the process being killed: it is in the kernel's page cache. It does
//! not survive a power loss; `durability = "power"` therefore does not use the journal.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::sqlite::{Entry, Op};

/// A segment is closed once it holds this many bytes.
const SEGMENT_BYTES: u64 = 8 << 20;

/// The open segment.
pub struct Journal {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    number: u64,
    bytes: u64,
}

/// A closed segment, deleted once every record in it is committed.
pub struct Retired {
    pub path: PathBuf,
    /// The last store sequence number written to it.
    pub last_seq: u64,
}

impl Journal {
    /// Opens a new segment numbered after every segment in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let next = segments(dir)?.last().map_or(1, |(n, _)| n + 1);
        Journal::create(dir, next)
    }

    fn create(dir: &Path, number: u64) -> std::io::Result<Journal> {
        let path = dir.join(format!("{number:020}.log"));
        let file = OpenOptions::new().create_new(true).append(true).open(&path)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            file,
            path,
            number,
            bytes: 0,
        })
    }

    /// Appends one record (a whole line, in one `write`).
    pub fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.file.write_all(line)?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// Starts a new segment if this one is full; returns the closed one, whose last record has
    /// sequence number `last_seq`.
    pub fn rotate_if_full(&mut self, last_seq: u64) -> std::io::Result<Option<Retired>> {
        if self.bytes < SEGMENT_BYTES {
            return Ok(None);
        }
        let next = Journal::create(&self.dir, self.number + 1)?;
        let old = std::mem::replace(self, next);
        Ok(Some(Retired {
            path: old.path,
            last_seq,
        }))
    }
}

/// Appends the journal line of a money operation to `out`; false (and nothing appended) if it is
/// not one the journal carries (or its ids could not be read back).
pub fn write_line(op: &Op, out: &mut Vec<u8>) -> bool {
    use std::io::Write as _;
    match op {
        Op::Ledger {
            request_id,
            key_id,
            entry: entry @ (Entry::Charge | Entry::Refund | Entry::PartialRefund),
            amount,
            at,
        } if !request_id.contains(char::is_whitespace) && !key_id.contains(char::is_whitespace) => {
            // Writing to a Vec cannot fail.
            let _ = writeln!(out, "{} {request_id} {key_id} {amount} {at}", entry.as_str());
            true
        }
        // JSON escapes every newline, so a row is one line.
        Op::Request(row) => {
            let start = out.len();
            out.extend_from_slice(b"request ");
            if serde_json::to_writer(&mut *out, row).is_err() {
                out.truncate(start);
                return false;
            }
            out.push(b'\n');
            true
        }
        _ => false,
    }
}

/// The journal line of a money operation, or `None` if it is not one the journal carries.
pub fn line(op: &Op) -> Option<String> {
    let mut out = Vec::new();
    write_line(op, &mut out).then(|| String::from_utf8(out).expect("journal lines are UTF-8"))
}

fn parse(line: &str) -> Option<Op> {
    if let Some(row) = line.strip_prefix("request ") {
        return serde_json::from_str(row).ok().map(Op::Request);
    }
    let mut f = line.split(' ');
    let entry = match f.next()? {
        "charge" => Entry::Charge,
        "refund" => Entry::Refund,
        "partial_refund" => Entry::PartialRefund,
        _ => return None,
    };
    let op = Op::Ledger {
        request_id: f.next()?.to_string(),
        key_id: f.next()?.to_string(),
        entry,
        amount: f.next()?.parse().ok()?,
        at: f.next()?.parse().ok()?,
    };
    f.next().is_none().then_some(op)
}

/// The segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let path = e?.path();
                let number = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(n) = number {
                    found.push((n, path));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    found.sort();
    Ok(found)
}

/// The records of one segment. A last line cut short by a crash mid-write is not a record (its
/// caller never saw the charge succeed); any other unreadable line is an error.
pub fn read(path: &Path) -> std::io::Result<Vec<Op>> {
    let text = std::fs::read_to_string(path)?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| {
            parse(l).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: line {} is not a journal record", path.display(), i + 1),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(id: &str, amount: i64) -> Op {
        Op::Ledger {
            request_id: id.into(),
            key_id: "key_1".into(),
            entry: Entry::Charge,
            amount,
            at: 1_764_000_000_000,
        }
    }

    #[test]
    fn records_read_back_as_written_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(line(&charge("req_a", 3)).unwrap().as_bytes()).unwrap();
        j.append(line(&charge("req_b", 4)).unwrap().as_bytes()).unwrap();
        j.append(b"refund req_b key_1 4 17").unwrap(); // no newline: cut by a crash
        let segs = segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 1);
        let ops = read(&segs[0].1).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(line(&ops[1]), line(&charge("req_b", 4)));
    }

    #[test]
    fn a_request_row_with_any_tool_name_is_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let row = Op::Request(super::super::sqlite::RequestRow {
            seq: 0,
            request_id: "req_c".into(),
            key_id: Some("key_1".into()),
            method: "tools/call".into(),
            tool: Some("two words\nand a line".into()),
            outcome: "allowed".into(),
            reason: None,
            credits: 3,
            duration_us: 120,
            created_at: 17,
        });
        j.append(line(&row).unwrap().as_bytes()).unwrap();
        j.append(line(&charge("req_d", 1)).unwrap().as_bytes()).unwrap();
        let ops = read(&segments(dir.path()).unwrap()[0].1).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(line(&ops[0]), line(&row));
    }

    #[test]
    fn a_garbled_record_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(b"charge req_a key_1 three 0\n").unwrap();
        assert!(read(&segments(dir.path()).unwrap()[0].1).is_err());
    }

    #[test]
    fn a_new_journal_numbers_its_segment_after_the_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = Journal::open(dir.path()).unwrap();
        let b = Journal::open(dir.path()).unwrap();
        assert_eq!(b.number, a.number + 1);
    }
}
