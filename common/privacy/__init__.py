"""Privacy accounting, holders' policies and ledgers.

``ACCOUNTANTS`` lives here, free of imports, so that reading a policy or a ledger does not
load Opacus (and torch): ``fedvault simulate`` starts runs without either.
"""

ACCOUNTANTS = ("prv", "rdp")  # Opacus accountants a holder may compose its spend with
