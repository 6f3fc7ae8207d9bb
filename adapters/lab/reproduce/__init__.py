"""``metactl reproduce``: the paper's comparison on the reference trainer
(``metactl.adapters.reference``), and its report.

Modules (torch and transformers are needed, so ``pip install metactl[reference]``):

* `experiment`: the configuration, one (controller, seed) arm as one GRPO run, the whole
  comparison under a lock on its output folder.
* `workers`: the worker processes that run arms in parallel, and `workers.RunControl`, through
  which an arm reports progress and sees a stop request.
* `presets`: the ``cpu`` and ``paper`` presets; `paper`: the paper preset's local model and data.
* `report`: the markdown + JSON + PNG report; `cli`: the command line.
"""
