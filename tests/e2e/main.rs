//! End-to-end tests of the real `tollgate` binary, spawned on port 0 and driven over HTTP as clients
//! drive it, in front of real upstreams (the fixture server, and the official server-everything).

mod billing;
mod everything;
mod http_upstream;
mod operations;
mod plugins;
mod stdio_upstream;
mod support;
mod transport;
