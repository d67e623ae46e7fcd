"""`python -m edm_lit.cli ...` and `torchrun -m edm_lit.cli train ...` (plain module, not generated)."""
import sys

from . import main

sys.exit(main())
