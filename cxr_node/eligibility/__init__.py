"""Every 'analyse this film or not, and why' rule; a refusal travels as a code (refusal), the text is for people."""
