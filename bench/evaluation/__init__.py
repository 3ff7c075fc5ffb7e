"""Evaluation beyond the protocol's test set: forgetting on the foundation's source domain (retention)
and false positives on scans with nothing to find (node-free). ``sets``: the versioned case sets;
``extra``: scoring a finished run's export, ``extra_eval.json`` and the per-run table columns;
``summary``: the leaderboard and report views."""
