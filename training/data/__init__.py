"""Data and sources: many sources merged into one manifest with grouped splits (``sources``, the kinds it
knows in ``kinds``), the dataset readers, split and uint8 cache (``records``), and film packs (``pack``,
format in ``filmpack``)."""
