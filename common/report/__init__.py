"""Privacy-budget reports of a run directory: rendering only.

The verification lives in :mod:`common.audit`; this package turns its result into files:

* :mod:`.content`     -- the report as data (= report.json)
* :mod:`.formatting`  -- numbers, ε and findings as text
* :mod:`.plots`       -- inline SVG plots
* :mod:`.render_html` / :mod:`.render_md` -- the two human-readable renderings
* :mod:`.build`       -- ``write_report``: all three files
"""

from common.report.build import write_report

__all__ = ["write_report"]
