from compress.import_path import drop_checkout_root as _drop_checkout_root
from compress.threads import prefer_passive_waiting as _prefer_passive_waiting

__version__ = "0.1.0"

# Before anything imports transformers: see compress/import_path.py.
_drop_checkout_root()
# Before anything imports torch (and with it OpenMP): see compress/threads.py.
_prefer_passive_waiting()
