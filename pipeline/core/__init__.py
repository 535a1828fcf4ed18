"""The record, the stage contract, the ledger and errors: what every step shares (no Beam)."""
