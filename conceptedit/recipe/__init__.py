"""Recipes: YAML files that say which edits to apply to which model, validated by pydantic."""
