"""Privacy-budget reports and audits of a run directory.

Modules, one job each:

* :mod:`.rundata`     -- read metrics.json and ledger.jsonl from a run directory
* :mod:`.recompute`   -- ε from raw mechanism parameters (Opacus RDP/PRV), cached, fast
* :mod:`.keys`        -- clients' public signing keys (and which partition each belongs to)
* :mod:`.checks`      -- mechanism warnings (δ ≥ 1/n, no subsampling, tiny batches)
* :mod:`.audit`       -- ``audit_run`` / ``audit_runs``: hashes, signatures, plans, every ε claim
* :mod:`.completeness` -- nothing missing: metrics.json's rounds and the keys given vs the ledger
* :mod:`.multirun`    -- one holder's chain across runs: forks (rollback), dropped entries
* :mod:`.content`     -- the report as data (= report.json)
* :mod:`.plots`       -- inline SVG plots
* :mod:`.render_html` / :mod:`.render_md` -- the two human-readable renderings
* :mod:`.build`       -- ``write_report``: all three files
"""

from common.report.audit import AuditResult, MultiAuditResult, audit_run, audit_runs
from common.report.build import write_report

__all__ = ["AuditResult", "MultiAuditResult", "audit_run", "audit_runs", "write_report"]
