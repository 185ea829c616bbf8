"""Offline tools, apart from the scoring domain (as River keeps ``evaluate``, ``datasets`` and ``stream``
apart from its estimators): :mod:`~models.offline.history` turns a CRM export into contract events,
:mod:`~models.offline.simulate` makes a realistic simulated population, and
:mod:`~models.offline.evaluate` replays a history through the stream's own step, test-then-train.

Pure, like the rest of :mod:`models`: the files are read, spilled and printed by :mod:`streams.offline`.
The scoring domain (features, rules, learners, scoring) never imports this package.
"""
