"""The shipped YAML run configs (package data): tiny.yaml is the embedded default."""
