"""Evaluation: suites of prompts sampled on an edited model and its base, scored, reported.

A wing beside :mod:`conceptedit.engine`: the two never import each other; :mod:`conceptedit.run`
calls both.
"""
