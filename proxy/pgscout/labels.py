"""Label values shared by every plane: the bound on client-chosen application names.

Owns: how many distinct application_name values get their own label or table entry, and the
name the rest share. Must not: import anything from pgscout.
"""

from typing import Final

# application_name is chosen by clients; past this many distinct names the rest share OTHER.
MAX_APPLICATIONS: Final = 256
OTHER: Final = "other"
