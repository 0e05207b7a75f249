//! `hostile`: a test-only plugin that misbehaves on purpose, to prove the host survives it. Never
//! loaded by default. Its configuration picks the misbehaviour: `{"mode": "..."}` with `loop`
//! (never returns), `memory` (allocates until it is stopped), `trap` (panics), `absurd` (prices a
//! call at u64::MAX), `huge` (a denial reason and a health report of many megabytes), `nan` (a
//! health score that is not a number), `echo` (denies every call with a reason that spells out the
//! call and the key it received, so a test can check what the host hands a plugin), or `ok`
//! (behaves: price 1, score 100). With
//! `"only_tag": "t"`, it misbehaves only when pricing calls of keys tagged `t` and prices every
//! other call at 1 credit, so a test can show that one bad decision leaves other keys unharmed.

use std::cell::Cell;

wit_bindgen::generate!({ world: "policy-plugin", path: "../../wit" });

use exports::tollgate::policy::health::{Component, Report, Snapshot};
use exports::tollgate::policy::pricing::{Charge, Denial};
use tollgate::policy::types::{Call, KeySnapshot};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Loop,
    Memory,
    Trap,
    Absurd,
    Huge,
    Nan,
    Echo,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Ok) };
    static ONLY_TAG: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

fn misbehave() -> Mode {
    let mode = MODE.with(Cell::get);
    match mode {
        Mode::Loop => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Mode::Memory => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Mode::Trap => panic!("hostile plugin: trap"),
        other => other,
    }
}

struct Plugin;

impl exports::tollgate::policy::lifecycle::Guest for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let mode = match v.get("mode").and_then(|m| m.as_str()).unwrap_or("ok") {
            "ok" => Mode::Ok,
            "loop" => Mode::Loop,
            "memory" => Mode::Memory,
            "trap" => Mode::Trap,
            "absurd" => Mode::Absurd,
            "huge" => Mode::Huge,
            "nan" => Mode::Nan,
            "echo" => Mode::Echo,
            other => return Err(format!("hostile: unknown mode {other:?}")),
        };
        MODE.with(|m| m.set(mode));
        let only = v.get("only_tag").and_then(|t| t.as_str()).map(str::to_string);
        ONLY_TAG.with(|t| *t.borrow_mut() = only);
        Ok(())
    }
}

impl exports::tollgate::policy::pricing::Guest for Plugin {
    fn price(call: Call, key: KeySnapshot) -> Result<Charge, Denial> {
        let spared = ONLY_TAG.with(|t| t.borrow().as_ref().is_some_and(|t| !key.tags.contains(t)));
        if spared {
            return Ok(Charge {
                credits: 1,
                output_surcharge: None,
            });
        }
        match misbehave() {
            Mode::Absurd => Ok(Charge {
                credits: u64::MAX,
                output_surcharge: None,
            }),
            Mode::Huge => Err(Denial {
                reason: "x".repeat(8 << 20),
            }),
            Mode::Echo => Err(Denial {
                reason: format!(
                    "{} {:?} {} {:?} {} {} | {} {} {:?} {:?} {} {} {} {:?} {} {:?}",
                    call.method,
                    call.tool,
                    call.argument_bytes,
                    call.arguments,
                    call.now_ms,
                    call.request_id,
                    key.id,
                    key.name,
                    key.tags,
                    key.namespace,
                    key.credits,
                    key.spent,
                    key.calls,
                    key.status,
                    key.created_ms,
                    key.expires_ms
                ),
            }),
            _ => Ok(Charge {
                credits: 1,
                output_surcharge: None,
            }),
        }
    }
}

impl exports::tollgate::policy::health::Guest for Plugin {
    fn score(_s: Snapshot) -> Report {
        match misbehave() {
            Mode::Huge => Report {
                score: 50.0,
                level: "huge".into(),
                components: (0..100_000)
                    .map(|i| Component {
                        name: format!("c{i}"),
                        score: 50.0,
                        weight: 0.0,
                        detail: "y".repeat(64),
                    })
                    .collect(),
            },
            Mode::Nan => Report {
                score: f64::NAN,
                level: "nan".into(),
                components: Vec::new(),
            },
            _ => Report {
                score: 100.0,
                level: "healthy".into(),
                components: Vec::new(),
            },
        }
    }
}

// Exported only in the component: on the build machine's own target the export names
// (`tollgate:policy/...`) are not valid linker symbols, and `cargo build` there would fail to link.
#[cfg(target_arch = "wasm32")]
export!(Plugin);
