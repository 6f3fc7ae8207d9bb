"""``metactl scoreboard``: every temperature controller on every testbed of a declared suite.

The suite, its development / held-out split, seeds, metrics and statistics are fixed by
``benchmarks/PROTOCOL.md``; :mod:`.suite` is its executable form, :mod:`.stats` the pure
statistics (normalised regret, paired bootstrap CI, paired tests), :mod:`.runner` the resumable
runs, :mod:`.report` the tables, heat-map and JSON, :mod:`.pages` the per-testbed pages with the
signal diagnostics of the likelihood rules (kept in the run records by :mod:`.signal_record`).
"""
