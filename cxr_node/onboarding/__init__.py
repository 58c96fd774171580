"""A site's own judgement: stations and modes, readers' labels (feedback), performance, site calibration, drift."""
