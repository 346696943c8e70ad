"""jepatune: find, and prove, the best training recipe for ByteJEPA.

Importing the package loads no torch, Ray, Optuna or pandas; the components do that
when they are used (`jepatune.trainer`, `jepatune.search`, `jepatune.analysis`).
"""

__version__ = "0.1.0"
