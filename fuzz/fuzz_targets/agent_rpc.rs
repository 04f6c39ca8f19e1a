//! The agent's JSON-RPC request decoding, step by step as its server does
//! it (JSON, the protocol version check, then `RpcRequest` with its
//! `Action`), and also in one step as `serde_json::from_slice`. A request
//! that decodes must encode again, and that encoding must decode: the
//! director's client sends what it encodes.
#![no_main]

use bosun_agent::protocol::{RpcRequest, RpcResponse, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server reads up to the first newline.
    let line = match data.iter().position(|b| *b == b'\n') {
        Some(pos) => &data[..pos],
        None => data,
    };
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) {
        let _id = value.get("id").and_then(|v| v.as_u64());
        let version = value.get("protocol_version").and_then(|v| v.as_u64());
        if version == Some(u64::from(PROTOCOL_VERSION)) {
            if let Ok(request) = serde_json::from_value::<RpcRequest>(value) {
                roundtrip(&request);
            }
        }
    }
    if let Ok(request) = serde_json::from_slice::<RpcRequest>(line) {
        roundtrip(&request);
    }
    // The director decodes the agent's answers with the same types.
    if let Err(e) = serde_json::from_slice::<RpcResponse>(line) {
        let _shown = e.to_string();
    }
});

fn roundtrip(request: &RpcRequest) {
    let encoded = serde_json::to_vec(request).expect("a decoded request encodes");
    serde_json::from_slice::<RpcRequest>(&encoded).expect("an encoded request decodes");
}
