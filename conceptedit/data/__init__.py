"""Prompt data: public prompt files by download source or local path."""
