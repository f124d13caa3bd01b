"""Stage 8, verdict: does the shipped model do the task, as shipped and fairly scored?

``judgement`` (flags, tables and the budget a target needs), ``stage`` (the run's stage).
"""
