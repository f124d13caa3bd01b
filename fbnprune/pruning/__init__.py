"""Stage 4, prune: a ``PrunePlan`` applied, reversibly (``mask``) or by smaller weights
(``slicing``); ``stage`` (the run's stage: a sliced copy per layout and their sizes).
"""
