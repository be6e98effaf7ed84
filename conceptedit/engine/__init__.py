"""The editing engine: runs a recipe's edits in order through the methods' hook points."""
