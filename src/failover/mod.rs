//! What a move means for the users it moves: closing their streams with a
//! re-login hint each ([`evict`], [`hints`], planned by [`plan`]) and
//! letting their logins back in at the pace the node can take
//! ([`admission`], [`pacer`]).
//!
//! The group monitor decides *that* users move; this module decides *how*
//! their streams end and when their logins are admitted again. It consumes
//! the monitor's [`MoveOrder`](crate::group::monitor::MoveOrder)s, closes
//! the affected streams, and answers each order only when those streams are
//! really closed, so the group's transient states (Taking Over, Falling
//! Back, …) last exactly as long as the move does.

pub mod admission;
pub mod evict;
pub mod hints;
pub mod pacer;
pub mod plan;

pub use admission::{Admission, Admit, Login};
pub use evict::{spawn, FailoverContext};
pub use hints::{Hints, Relogin, Why};
pub use pacer::{Pace, Pacer};
