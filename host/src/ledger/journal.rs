//! The charge journal: an append-only file that makes a settled call (its charge, refund and
//! request-log row) durable on the caller's thread, with no system call: segments are mapped into
//! memory, so an append is a copy into the page cache. The hot path never waits for a database
//! commit or wakes the writer. The database catches up in batches behind it; at start-up, whatever
//! the database had not yet committed is replayed from the journal (a ledger row cannot be applied
//! twice, so replaying a committed one changes nothing), and segments whose records are all
//! committed are deleted.
//!
//! A call's request-log row is journaled with its charge: it is what usage webhooks deliver, so a
//! settled call's event survives a kill as its charge does. Replayed rows are skipped by their
//! request id.
//!
//! A written record survives the process being killed: it is in the kernel's page cache (a
//! shared file mapping), which the kernel writes back as it does any file. It does not survive a
//! power loss; `durability = "power"` therefore does not use the journal. Each segment's blocks
//! are reserved (`posix_fallocate`) before it is mapped, so a full disk fails the segment's
//! creation, never a write into the mapping.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering, fence};

use super::sqlite::{Entry, Op};

/// The size of a segment (one bigger record gets a segment of its own size).
pub const SEGMENT_BYTES: usize = 8 << 20;

/// The journal: the open segment, the next one (made ahead of time, off the hot path), and the
/// full ones not yet committed.
pub struct Journal {
    dir: PathBuf,
    seg: Segment,
    /// Bytes written to `seg` so far; the rest of its mapping is zeros.
    len: usize,
    next: Option<Segment>,
    /// Full segments, waiting for the database to commit their records.
    retired: Vec<Retired>,
}

/// One segment file, its blocks reserved and mapped.
pub struct Segment {
    path: PathBuf,
    number: u64,
    map: memmap2::MmapMut,
    /// Its pages were faulted in writable when it was made (no fault on the first append).
    prefaulted: bool,
    _file: File,
}

impl Segment {
    /// Creates segment `number` in `dir`, `size` bytes long. Takes a few milliseconds (the blocks
    /// are reserved and the mapping populated), so the writer thread makes them ahead of time.
    pub fn create(dir: &Path, number: u64, size: usize) -> std::io::Result<Segment> {
        use std::os::fd::AsRawFd;
        let path = dir.join(format!("{number:020}.log"));
        let file = OpenOptions::new().create_new(true).read(true).write(true).open(&path)?;
        // SAFETY: a plain call on a file descriptor we own.
        let reserved = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
        if reserved != 0 {
            let _ = std::fs::remove_file(&path);
            return Err(std::io::Error::from_raw_os_error(reserved));
        }
        // SAFETY: the file was created by this call (create_new) in the gateway's own data
        // directory; nothing else writes or truncates it while it is mapped, and its blocks are
        // reserved, so no access to the mapping can fail (no SIGBUS).
        let map = unsafe { memmap2::MmapOptions::new().len(size).populate().map_mut(&file)? };
        // A shared file mapping is populated read-only: the first write to each page would
        // fault, and the file system's write fault (ext4: block checks, the inode's time) ran
        // on the request path, ~2 us a call. Taken here instead, ahead of time. Linux 5.14
        // and later; elsewhere the pages fault on first write as before.
        #[cfg(target_os = "linux")]
        let prefaulted = match map.advise(memmap2::Advice::PopulateWrite) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "journal segment not prefaulted for writing");
                false
            }
        };
        #[cfg(not(target_os = "linux"))]
        let prefaulted = false;
        Ok(Segment {
            path,
            number,
            map,
            prefaulted,
            _file: file,
        })
    }
}

/// A closed segment, deleted once every record in it is committed.
pub struct Retired {
    pub path: PathBuf,
    /// The last store sequence number written to it.
    pub last_seq: u64,
    /// Its mapping, unmapped when this is dropped: by the writer thread, after the commit. Not
    /// where the segment fills up, under the lock every paid call takes: unmapping a full segment
    /// takes about a millisecond (measured: 0.94-1.10 ms for 8 MiB).
    _segment: Segment,
}

impl Journal {
    /// Opens a new segment numbered after every segment in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let next = segments(dir)?.last().map_or(1, |(n, _)| n + 1);
        Journal::starting_at(dir, next, SEGMENT_BYTES)
    }

    fn starting_at(dir: &Path, number: u64, size: usize) -> std::io::Result<Journal> {
        let seg = Segment::create(dir, number, size)?;
        if !seg.prefaulted {
            tracing::info!(
                "this kernel cannot prefault journal pages for writing: the first record on each page takes a page fault"
            );
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            seg,
            len: 0,
            next: None,
            retired: Vec::new(),
        })
    }

    /// Appends records (whole lines). `last_seq`: the store sequence number of the last record
    /// already in the journal, which closes the segment if this one starts a new one.
    pub fn append(&mut self, lines: &[u8], last_seq: u64) -> std::io::Result<()> {
        let Some((&newline, body)) = lines.split_last() else {
            return Ok(());
        };
        debug_assert_eq!(newline, b'\n');
        // At most twice: the next segment made ahead may be too small for one huge record.
        while self.len + lines.len() > self.seg.map.len() {
            let next = match self.next.take() {
                Some(s) => s,
                None => self.segment_after(SEGMENT_BYTES.max(lines.len()))?,
            };
            let old = std::mem::replace(&mut self.seg, next);
            self.len = 0;
            self.retired.push(Retired {
                path: old.path.clone(),
                last_seq,
                _segment: old,
            });
        }
        // The body first, then its final newline: a kill part-way leaves a last line without
        // one, which is not a record (its caller never saw the call succeed).
        self.map_mut()[..body.len()].copy_from_slice(body);
        fence(Ordering::Release);
        self.map_mut()[body.len()] = b'\n';
        self.len += lines.len();
        Ok(())
    }

    /// A new segment to roll over to, made here because none was made ahead. The writer thread
    /// may be making the next number at this very moment (it does so outside the lock this runs
    /// under): then this takes the number after it, and the writer's, offered too late, is deleted
    /// unused (an empty segment, which replays as nothing if the gateway dies first).
    fn segment_after(&self, size: usize) -> std::io::Result<Segment> {
        let mut number = self.seg.number + 1;
        loop {
            match Segment::create(&self.dir, number, size) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && number < self.seg.number + 8 => number += 1,
                made => return made,
            }
        }
    }

    /// The unwritten rest of the open segment.
    fn map_mut(&mut self) -> &mut [u8] {
        &mut self.seg.map[self.len..]
    }

    /// Takes the segments closed since the last call.
    pub fn take_retired(&mut self) -> Vec<Retired> {
        std::mem::take(&mut self.retired)
    }

    /// Where and which segment to make ahead of time, once the open one is three quarters full
    /// and none is waiting.
    pub fn next_wanted(&self) -> Option<(PathBuf, u64)> {
        (self.next.is_none() && self.len > self.seg.map.len() / 4 * 3).then(|| (self.dir.clone(), self.seg.number + 1))
    }

    /// Takes a segment made ahead of time, if it is still the next one (a full segment may have
    /// rolled over meanwhile); otherwise it is deleted.
    pub fn offer_next(&mut self, s: Segment) {
        if self.next.is_none() && s.number == self.seg.number + 1 {
            self.next = Some(s);
        } else if let Err(e) = std::fs::remove_file(&s.path) {
            tracing::warn!(path = %s.path.display(), error = %e, "could not delete an unused journal segment");
        }
    }
}

/// Appends the journal line of a money operation to `out`; false (and nothing appended) if it is
/// not one the journal carries (or its ids could not be read back).
///
/// Written by hand, not with `fmt` or serde: this runs on the request path of every paid call, and
/// formatting was ~3 us of it. The request row is the JSON that serde writes for it (a test holds
/// the two equal), so journals written by either read back the same.
pub fn write_line(op: &Op, out: &mut Vec<u8>) -> bool {
    match op {
        Op::Ledger {
            request_id,
            key_id,
            entry: entry @ (Entry::Charge | Entry::Refund | Entry::PartialRefund),
            amount,
            at,
        } if !request_id.contains(char::is_whitespace) && !key_id.contains(char::is_whitespace) => {
            let mut n = itoa::Buffer::new();
            out.extend_from_slice(entry.as_str().as_bytes());
            for field in [request_id.as_str(), key_id, n.format(*amount)] {
                out.push(b' ');
                out.extend_from_slice(field.as_bytes());
            }
            out.push(b' ');
            out.extend_from_slice(n.format(*at).as_bytes());
            out.push(b'\n');
            true
        }
        // JSON escapes every newline, so a row is one line.
        Op::Request(row) => {
            // Every field, by name: a field added to the row cannot be left out of its record.
            let super::sqlite::RequestRow {
                seq,
                request_id,
                key_id,
                method,
                tool,
                outcome,
                reason,
                credits,
                duration_us,
                created_at,
            } = row;
            let mut n = itoa::Buffer::new();
            out.extend_from_slice(b"request {\"seq\":");
            out.extend_from_slice(n.format(*seq).as_bytes());
            out.extend_from_slice(b",\"request_id\":");
            json_string(out, request_id);
            out.extend_from_slice(b",\"key_id\":");
            json_option(out, key_id.as_deref());
            out.extend_from_slice(b",\"method\":");
            json_string(out, method);
            out.extend_from_slice(b",\"tool\":");
            json_option(out, tool.as_deref());
            out.extend_from_slice(b",\"outcome\":");
            json_string(out, outcome);
            out.extend_from_slice(b",\"reason\":");
            json_option(out, reason.as_deref());
            out.extend_from_slice(b",\"credits\":");
            out.extend_from_slice(n.format(*credits).as_bytes());
            out.extend_from_slice(b",\"duration_us\":");
            out.extend_from_slice(n.format(*duration_us).as_bytes());
            out.extend_from_slice(b",\"created_at\":");
            out.extend_from_slice(n.format(*created_at).as_bytes());
            out.extend_from_slice(b"}\n");
            true
        }
        _ => false,
    }
}

/// `s` as a JSON string (see [`json_string`]), or `null`.
pub fn json_option(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it (see [`json_escaped`]). Webhook usage
/// events are written with it too.
pub fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    json_escaped(out, s);
    out.push(b'"');
}

/// `s` escaped as inside a JSON string, as serde_json escapes it: quote, backslash and the control
/// characters (short forms where JSON has them, `\u00XX` otherwise); everything else as it is.
pub fn json_escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    // Ids, methods, tool names and outcomes need no escape: found in one pass without branches
    // (the compiler vectorizes it), then copied at once.
    if !bytes
        .iter()
        .fold(false, |esc, &b| esc | (b < 0x20) | (b == b'"') | (b == b'\\'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short == 0 {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
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
        request_id: f.next()?.into(),
        key_id: f.next()?.into(),
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
/// caller never saw the charge succeed), nor is the unwritten (zero) rest of the segment; any
/// other unreadable line is an error.
pub fn read(path: &Path) -> std::io::Result<Vec<Op>> {
    let bytes = std::fs::read(path)?;
    // Everything up to (not including) the last newline.
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => &bytes[..i],
        None => return Ok(Vec::new()),
    };
    complete
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| {
            std::str::from_utf8(l).ok().and_then(parse).ok_or_else(|| {
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

    /// The journal line of a money operation, or `None` if it is not one the journal carries.
    fn line(op: &Op) -> Option<String> {
        let mut out = Vec::new();
        write_line(op, &mut out).then(|| String::from_utf8(out).expect("journal lines are UTF-8"))
    }

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
        j.append(line(&charge("req_a", 3)).unwrap().as_bytes(), 0).unwrap();
        j.append(line(&charge("req_b", 4)).unwrap().as_bytes(), 1).unwrap();
        // A kill part-way through the next record: its body, not its newline.
        let torn = b"refund req_b key_1 4 17";
        j.map_mut()[..torn.len()].copy_from_slice(torn);
        let segs = segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 1);
        let ops = read(&segs[0].1).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(line(&ops[1]), line(&charge("req_b", 4)));
    }

    #[test]
    fn a_full_segment_is_retired_with_its_last_sequence_number_and_both_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::starting_at(dir.path(), 1, 64).unwrap();
        let a = line(&charge("req_a", 3)).unwrap();
        let b = line(&charge("req_b", 4)).unwrap();
        j.append(a.as_bytes(), 0).unwrap();
        assert!(j.take_retired().is_empty());
        j.append(b.as_bytes(), 1).unwrap(); // does not fit in 64 bytes
        let retired = j.take_retired();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].last_seq, 1, "the old segment ends with the record before");
        let segs = segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(read(&segs[0].1).unwrap().len(), 1);
        assert_eq!(line(&read(&segs[1].1).unwrap()[0]).unwrap(), b);
    }

    #[test]
    fn a_segment_made_ahead_of_time_is_the_one_a_full_segment_rolls_over_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::starting_at(dir.path(), 1, 80).unwrap();
        let a = line(&charge("req_a", 3)).unwrap(); // 35 bytes
        j.append(a.as_bytes(), 0).unwrap();
        assert!(j.next_wanted().is_none(), "not three quarters full yet");
        j.append(a.as_bytes(), 1).unwrap();
        let (at, number) = j.next_wanted().expect("three quarters full");
        j.offer_next(Segment::create(&at, number, 80).unwrap());
        assert!(j.next_wanted().is_none(), "one is waiting");
        // A stale offer (not the next number) is deleted, not used.
        j.offer_next(Segment::create(&at, number + 5, 80).unwrap());
        j.append(a.as_bytes(), 2).unwrap(); // rolls over
        assert_eq!(j.seg.number, number);
        assert_eq!(j.take_retired()[0].last_seq, 2);
        let segs: Vec<u64> = segments(dir.path()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(segs, vec![1, 2], "the stale segment was deleted");
    }

    #[test]
    fn a_full_segment_rolls_over_while_the_next_one_is_still_being_made_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::starting_at(dir.path(), 1, 80).unwrap();
        let a = line(&charge("req_a", 3)).unwrap(); // 35 bytes
        j.append(a.as_bytes(), 0).unwrap();
        j.append(a.as_bytes(), 1).unwrap();
        let (at, number) = j.next_wanted().expect("three quarters full");
        // The writer thread is making segment 2, not offered yet, when an append needs it.
        let ahead = Segment::create(&at, number, 80).unwrap();
        j.append(a.as_bytes(), 2).expect("the append takes the number after it");
        assert_eq!(j.seg.number, number + 1);
        j.offer_next(ahead);
        assert!(j.next.is_none(), "the late one is not used");
        let segs: Vec<u64> = segments(dir.path()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(segs, vec![1, 3], "and it is deleted");
        assert_eq!(line(&read(&segments(dir.path()).unwrap()[1].1).unwrap()[0]).unwrap(), a);
    }

    #[test]
    fn a_record_bigger_than_a_segment_gets_a_segment_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::starting_at(dir.path(), 1, 16).unwrap();
        let a = line(&charge("req_with_a_long_id", 3)).unwrap();
        j.append(a.as_bytes(), 0).unwrap();
        let segs = segments(dir.path()).unwrap();
        assert_eq!(line(&read(&segs.last().unwrap().1).unwrap()[0]).unwrap(), a);
    }

    #[test]
    fn a_request_row_with_any_tool_name_is_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let row = Op::Request(super::super::sqlite::RequestRow {
            tool: Some("two words\nand a line".into()),
            credits: 3,
            created_at: 17,
            ..super::super::sqlite::RequestRow::sample("req_c")
        });
        j.append(line(&row).unwrap().as_bytes(), 0).unwrap();
        j.append(line(&charge("req_d", 1)).unwrap().as_bytes(), 1).unwrap();
        let ops = read(&segments(dir.path()).unwrap()[0].1).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(line(&ops[0]), line(&row));
    }

    #[test]
    fn a_request_row_is_written_as_the_json_serde_writes_for_it() {
        let odd = "quote \" backslash \\ nl \n cr \r tab \t bs \u{8} ff \u{c} nul \0 esc \u{1b} del \u{7f} é 🦀";
        let rows = [
            super::super::sqlite::RequestRow::sample("req_a"),
            super::super::sqlite::RequestRow {
                seq: -7,
                key_id: None,
                tool: None,
                reason: Some(odd.into()),
                credits: i64::MIN,
                duration_us: i64::MAX,
                created_at: 1_764_000_000_000,
                ..super::super::sqlite::RequestRow::sample(odd)
            },
            super::super::sqlite::RequestRow {
                method: Default::default(),
                tool: Some((0u8..0x20).map(char::from).collect()),
                outcome: "refunded".into(),
                ..super::super::sqlite::RequestRow::sample("")
            },
        ];
        for row in rows {
            let written = line(&Op::Request(row.clone())).unwrap();
            let serde = format!("request {}\n", serde_json::to_string(&row).unwrap());
            assert_eq!(written, serde);
            let Some(Op::Request(back)) = parse(written.trim_end_matches('\n')) else {
                panic!("{written} did not read back");
            };
            assert_eq!(back, row);
        }
    }

    #[test]
    fn each_character_json_escapes_is_escaped_even_alone_in_a_plain_string() {
        let specials = (0u8..0x20).map(char::from).chain(['"', '\\']);
        for c in specials.chain(['a', '\u{7f}', 'é']) {
            let s = format!("req_{c}_tail");
            let mut out = Vec::new();
            json_string(&mut out, &s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&s).unwrap(),
                "{c:?}"
            );
        }
    }

    #[test]
    fn a_charge_line_reads_back_as_the_charge() {
        for (entry, amount, at) in [
            (Entry::Charge, 3, 17),
            (Entry::Refund, 0, -1),
            (Entry::PartialRefund, i64::MAX, i64::MIN),
        ] {
            let op = Op::Ledger {
                request_id: "req_00000000000000ff".into(),
                key_id: "key_1".into(),
                entry,
                amount,
                at,
            };
            let written = line(&op).unwrap();
            assert_eq!(
                written,
                format!("{} req_00000000000000ff key_1 {amount} {at}\n", entry.as_str())
            );
            assert_eq!(line(&parse(written.trim_end_matches('\n')).unwrap()).unwrap(), written);
        }
    }

    #[test]
    fn a_garbled_record_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(b"charge req_a key_1 three 0\n", 0).unwrap();
        assert!(read(&segments(dir.path()).unwrap()[0].1).is_err());
    }

    /// Minor page faults taken by this thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
        usage.ru_minflt
    }

    #[test]
    fn appending_to_a_new_segment_takes_no_page_faults() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::starting_at(dir.path(), 1, 1 << 20).unwrap();
        if !j.seg.prefaulted {
            eprintln!("skipped: this kernel cannot prefault a shared mapping for writing");
            return;
        }
        let record = line(&charge("req_a", 3)).unwrap();
        let before = minor_faults();
        // 256 pages' worth of records.
        for i in 0..(1 << 20) / record.len() - 1 {
            j.append(record.as_bytes(), i as u64).unwrap();
        }
        let faults = minor_faults() - before;
        assert!(faults < 16, "{faults} page faults while filling 256 pages");
        assert_eq!(
            read(&segments(dir.path()).unwrap()[0].1).unwrap().len(),
            (1 << 20) / record.len() - 1
        );
    }

    #[test]
    fn a_new_journal_numbers_its_segment_after_the_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = Journal::open(dir.path()).unwrap();
        let b = Journal::open(dir.path()).unwrap();
        assert_eq!(b.seg.number, a.seg.number + 1);
    }
}
