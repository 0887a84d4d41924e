//! Shared by the benches.
#![allow(dead_code)]

pub mod alloc;
pub mod rng;
