//! Lowering a pricing call's two records into the plugin's memory in one pass.
//!
//! wasmtime's derived lowering writes a record field by field, and looks up the guest's memory
//! again for every field it writes (perf: ~18 % of a warm `price` call, for the ~45 writes of a
//! call and a key). [`Fast`] places each string with one allocation and one copy, builds the
//! record's bytes on the stack and copies them in once. It is used when the plugin takes UTF-8
//! strings (what Rust and most guests do); any other string encoding goes through the derived
//! lowering, which transcodes.

use std::mem::MaybeUninit;

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext};
use wasmtime::component::{ComponentType, Lower};

use super::{CallArg, KeyArg, KeyStatus};

/// A record lowered in one pass (see the module's documentation); typed exactly as the record.
pub struct Fast<T>(pub T);

// SAFETY: every item delegates to `T`'s own implementation: the same type, ABI and checks.
unsafe impl<T: ComponentType> ComponentType for Fast<T> {
    type Lower = T::Lower;
    const ABI: CanonicalAbiInfo = T::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        T::typecheck(ty, types)
    }
}

/// The byte offset of each field of a record with fields of `fields`' layouts (canonical ABI,
/// 32-bit memory): each field at the next multiple of its alignment.
const fn offsets<const N: usize>(fields: [CanonicalAbiInfo; N]) -> [usize; N] {
    let mut out = [0; N];
    let mut at = 0u32;
    let mut i = 0;
    while i < N {
        at = at.next_multiple_of(fields[i].align32);
        out[i] = at as usize;
        at += fields[i].size32;
        i += 1;
    }
    out
}

/// Where the value of an `option<T>` sits: past its one-byte discriminant, aligned for `T`.
const fn payload(t: CanonicalAbiInfo) -> usize {
    1usize.next_multiple_of(t.align32 as usize)
}

const STR: CanonicalAbiInfo = <&str as ComponentType>::ABI;
const OPT_STR: CanonicalAbiInfo = <Option<&str> as ComponentType>::ABI;
const U64: CanonicalAbiInfo = <u64 as ComponentType>::ABI;
const S64: CanonicalAbiInfo = <i64 as ComponentType>::ABI;

const CALL: [usize; 6] = offsets([STR, OPT_STR, U64, OPT_STR, S64, STR]);
const CALL_SIZE: usize = <CallArg<'static> as ComponentType>::SIZE32;
const KEY: [usize; 10] = offsets([
    STR,
    STR,
    <&[String] as ComponentType>::ABI,
    OPT_STR,
    S64,
    S64,
    U64,
    <KeyStatus as ComponentType>::ABI,
    S64,
    <Option<i64> as ComponentType>::ABI,
]);
const KEY_SIZE: usize = <KeyArg<'static> as ComponentType>::SIZE32;

/// The longest string the canonical ABI can pass (wasmtime refuses longer ones too).
const MAX_STRING_BYTES: usize = (1 << 31) - 1;

#[cfg(test)]
thread_local! {
    /// Makes this thread lower through the derived path, as for a plugin with another string
    /// encoding (tests of that path).
    pub static DERIVED_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the guest takes strings as UTF-8 bytes, so that they are copied as they are.
fn utf8<T>(cx: &LowerContext<'_, T>) -> bool {
    #[cfg(test)]
    if DERIVED_ONLY.with(|d| d.get()) {
        return false;
    }
    matches!(cx.options().string_encoding, StringEncoding::Utf8)
}

/// Copies `s` into the guest (one allocation) and returns its pointer and length as stored.
fn string<T>(cx: &mut LowerContext<'_, T>, s: &str) -> wasmtime::Result<[u8; 8]> {
    if s.len() > MAX_STRING_BYTES {
        return Err(wasmtime::format_err!(
            "a string of {} bytes is too long to pass to a plugin",
            s.len()
        ));
    }
    let ptr = cx.realloc(0, 0, 1, s.len())?;
    // In bounds: `realloc` checked that its answer and `s.len()` bytes past it are in memory.
    cx.as_slice_mut()[ptr..][..s.len()].copy_from_slice(s.as_bytes());
    Ok(pair(ptr, s.len()))
}

fn pair(ptr: usize, len: usize) -> [u8; 8] {
    let mut p = [0; 8];
    p[..4].copy_from_slice(&(ptr as u32).to_le_bytes());
    p[4..].copy_from_slice(&(len as u32).to_le_bytes());
    p
}

fn put(rec: &mut [u8], at: usize, bytes: &[u8]) {
    rec[at..][..bytes.len()].copy_from_slice(bytes);
}

fn put_opt_str<T>(cx: &mut LowerContext<'_, T>, rec: &mut [u8], at: usize, s: Option<&str>) -> wasmtime::Result<()> {
    if let Some(s) = s {
        rec[at] = 1;
        let p = string(cx, s)?;
        put(rec, at + payload(STR), &p);
    }
    Ok(())
}

/// A record [`Fast`] can lower in one pass: its size in memory, and how to place its strings and
/// write its bytes.
pub trait OnePass: Lower {
    /// The record's size in linear memory (its derived `SIZE32`).
    const SIZE: usize;

    /// Places the record's strings in the guest and writes its `SIZE` bytes into `rec`.
    fn place<T>(&self, cx: &mut LowerContext<'_, T>, rec: &mut [u8]) -> wasmtime::Result<()>;
}

/// Room for the largest record [`OnePass`] writes.
const MAX_RECORD: usize = if CALL_SIZE > KEY_SIZE { CALL_SIZE } else { KEY_SIZE };

// SAFETY: `place` writes exactly the canonical ABI layout of the record (offsets computed from the
// fields' own ABI information, its size from the derived `ComponentType`), copied into the area
// wasmtime allocated and bounds-checked for it; anything else delegates to the derived lowering.
unsafe impl<R: OnePass> Lower for Fast<R> {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        self.0.linear_lower_to_flat(cx, ty, dst)
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        if !utf8(cx) {
            return self.0.linear_lower_to_memory(cx, ty, offset);
        }
        let mut buf = [0u8; MAX_RECORD];
        let rec = &mut buf[..R::SIZE];
        self.0.place(cx, rec)?;
        cx.as_slice_mut()[offset..][..R::SIZE].copy_from_slice(rec);
        Ok(())
    }
}

impl OnePass for CallArg<'_> {
    const SIZE: usize = CALL_SIZE;

    fn place<T>(&self, cx: &mut LowerContext<'_, T>, rec: &mut [u8]) -> wasmtime::Result<()> {
        let method = string(cx, self.method)?;
        put(rec, CALL[0], &method);
        put_opt_str(cx, rec, CALL[1], self.tool)?;
        put(rec, CALL[2], &self.argument_bytes.to_le_bytes());
        put_opt_str(cx, rec, CALL[3], self.arguments)?;
        put(rec, CALL[4], &self.now_ms.to_le_bytes());
        let request_id = string(cx, self.request_id)?;
        put(rec, CALL[5], &request_id);
        Ok(())
    }
}

impl OnePass for KeyArg<'_> {
    const SIZE: usize = KEY_SIZE;

    fn place<T>(&self, cx: &mut LowerContext<'_, T>, rec: &mut [u8]) -> wasmtime::Result<()> {
        let id = string(cx, self.id)?;
        put(rec, KEY[0], &id);
        let name = string(cx, self.name)?;
        put(rec, KEY[1], &name);
        // The list's elements are pointer pairs, as a string field is.
        let bytes = self.tags.len().checked_mul(STR.size32 as usize);
        let Some(bytes) = bytes.filter(|b| *b <= MAX_STRING_BYTES) else {
            return Err(wasmtime::format_err!(
                "{} tags are too many to pass to a plugin",
                self.tags.len()
            ));
        };
        let list = cx.realloc(0, 0, STR.align32, bytes)?;
        for (i, tag) in self.tags.iter().enumerate() {
            let p = string(cx, tag)?;
            cx.as_slice_mut()[list + i * STR.size32 as usize..][..8].copy_from_slice(&p);
        }
        put(rec, KEY[2], &pair(list, self.tags.len()));
        put_opt_str(cx, rec, KEY[3], self.namespace)?;
        put(rec, KEY[4], &self.credits.to_le_bytes());
        put(rec, KEY[5], &self.spent.to_le_bytes());
        put(rec, KEY[6], &self.calls.to_le_bytes());
        rec[KEY[7]] = match self.status {
            KeyStatus::Active => 0,
            KeyStatus::Suspended => 1,
            KeyStatus::Revoked => 2,
        };
        put(rec, KEY[8], &self.created_ms.to_le_bytes());
        if let Some(e) = self.expires_ms {
            rec[KEY[9]] = 1;
            put(rec, KEY[9] + payload(S64), &e.to_le_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_fields_end_where_the_derived_layout_says_the_records_end() {
        let end = |last: usize, size: u32, align: u32| (last + size as usize).next_multiple_of(align as usize);
        let call = <CallArg<'static> as ComponentType>::ABI;
        assert_eq!(end(CALL[5], STR.size32, call.align32), CALL_SIZE);
        let key = <KeyArg<'static> as ComponentType>::ABI;
        let opt_s64 = <Option<i64> as ComponentType>::ABI;
        assert_eq!(end(KEY[9], opt_s64.size32, key.align32), KEY_SIZE);
        assert_eq!((CALL, CALL_SIZE), ([0, 8, 24, 32, 48, 56], 64));
        assert_eq!((KEY, KEY_SIZE), ([0, 8, 16, 24, 40, 48, 56, 64, 72, 80], 96));
    }
}
