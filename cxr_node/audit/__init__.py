"""The audit trail (trail: hash chain), its backlog when the database is down, and the ATNA export (atna)."""
