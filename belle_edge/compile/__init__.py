"""The compiler: a checkpoint to an artifact for a target, as a row of stages (``pipeline``), one module
each, handing the model on through folders (``job``); see pipeline.py for which stages run for which target."""
