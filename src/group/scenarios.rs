//! Table 2 scenarios.
