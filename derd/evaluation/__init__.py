"""Evaluation: white-box attacks and AutoAttack on the test (or val) split, per-example flags stored by
content key, sanity checks and the ε-curve (METHOD.md §Evaluation)."""
