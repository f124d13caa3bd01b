"""The stages of a run, one module each, and the orchestrator that runs them in order.

collect -> discover -> select -> prune -> check -> save -> heal: each a function of the
run's ``RunContext`` and its predecessors' artifacts, reused when its inputs are unchanged.
"""
