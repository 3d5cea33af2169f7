"""The audit of a run directory: what a ledger and metrics.json can be shown to say.

Verification only; :mod:`common.report` renders the result. Modules, one job each:

* :mod:`.rundata`      -- read metrics.json and ledger.jsonl from a run directory (via RunDir)
* :mod:`.recompute`    -- ε from raw mechanism parameters (Opacus RDP/PRV), cached, fast
* :mod:`.keys`         -- clients' public signing keys (and which partition each belongs to)
* :mod:`.checks`       -- mechanism warnings (δ ≥ 1/n, no subsampling, tiny batches)
* :mod:`.audit`        -- ``audit_run`` / ``audit_runs``: hashes, signatures, plans, every ε claim
* :mod:`.completeness` -- nothing missing: metrics.json's rounds and the keys given vs the ledger
* :mod:`.multirun`     -- one holder's chain across runs: forks (rollback), dropped entries
"""

from common.audit.audit import DEFAULT_TOLERANCE, AuditResult, audit_run, audit_runs
from common.audit.multirun import MultiAuditResult

__all__ = ["DEFAULT_TOLERANCE", "AuditResult", "MultiAuditResult", "audit_run", "audit_runs"]
