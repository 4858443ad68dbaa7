//! CONNECT tunnels.
