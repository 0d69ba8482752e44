//! (ledger tests)
