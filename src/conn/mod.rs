//! A client connection: the CONNECT handshake (`handshake`, `auth`), the state machine of
//! an accepted connection (`machine`), how it ends (`exit`), and the task that drives it
//! over a byte stream (`driver`, the only async part).

mod auth;
mod driver;
mod exit;
mod handshake;
mod machine;

pub use driver::serve;
pub use exit::{Exit, Outcome};
pub use handshake::{negotiate, Negotiated, Refusal};
pub use machine::Connection;
