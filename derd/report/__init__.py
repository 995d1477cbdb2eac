"""Reporting: the comparison tables and report pages (:mod:`.tables`) and every figure (:mod:`.plots`)."""
