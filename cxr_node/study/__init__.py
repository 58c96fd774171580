"""A study from complete to processed: the state machine (states) and the pipeline's stages (pipeline)."""
