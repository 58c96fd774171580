"""modality --C-STORE--> receive: the Storage SCP (scp), connection limits, ingest (checks, spool, rows)."""
