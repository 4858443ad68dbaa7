//! The `check` and `explain` commands, run as the real binary.
