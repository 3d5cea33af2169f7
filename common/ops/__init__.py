"""Operator tooling: the ``fedvault`` command and what only it runs.

Simulated federations (``simulate``, ``scenarios``), deployments and their bundles
(``deploy``, ``provision``), the data holder's app launcher (``approved_app``), evaluation and
prediction on a finished run (``inference``) and the audit/report commands (``audit_cli``).

Neither the ServerApp (``server/``) nor the ClientApp (``client/``) imports anything here, nor
does the rest of ``common/``: they are what a Flower run ships to every node, while this is what
a person runs (``tests/test_layout.py`` checks the rule).
"""
