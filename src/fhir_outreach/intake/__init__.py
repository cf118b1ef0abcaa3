"""Intake: the front door. Hook deliveries are stored raw in the inbox, normalised into one event record per
change, deduplicated, ordered by resource version and read back from the source when not included."""
