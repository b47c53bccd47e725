"""Helpers shared by the tests: tiny models, small pipeline runs, a toy sharded artifact."""
