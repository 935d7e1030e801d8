"""The batch engine behind ``csm-serve``: many utterances stepping together one frame at a time.

``engine`` schedules utterances into cache slots (``slots``) and runs one batched frame
(``step``) and one batched Mimi decode (``codec``) per tick; ``events`` is what it reports.
"""
