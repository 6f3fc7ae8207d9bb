"""The lab: metactl's experiment runners and reports, built on the library and the integrations.

Nothing here is needed to train with metactl; these are the commands that compare controllers:

* `controllers`: the one registry of controller names (``fixed-0.9``, ``tampo``, ``linear-0.9-1.5``,
  ``recommended``, ...) that every command below parses.
* `reproduce`: ``metactl reproduce``, the paper's comparison on the reference trainer.
* `gym_study`: ``metactl gym-study``, every controller on ``metactl/TokenSearch-v0`` over seeds.
* `scoreboard`: ``metactl scoreboard``, every controller on every testbed of
  ``benchmarks/PROTOCOL.md``.
* `signal_plot`: the figure of a likelihood rule's signal diagnostics.
* `commands`: what the commands share (one-line argument errors, the output-folder checks and
  lock).

The dependency runs one way: the lab imports the library and the integrations
(``metactl.adapters.reference``, ``metactl.adapters.gym``); nothing outside the lab imports it.
"""
