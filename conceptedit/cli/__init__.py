"""The conceptedit command line."""
