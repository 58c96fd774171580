"""DICOM shared by receiving and sending: DIMSE statuses (one table) and TLS contexts."""
