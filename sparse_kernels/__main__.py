"""``python -m sparse_kernels``: the ``sparse-kernels`` command line (see :mod:`sparse_kernels.cli`)."""

import sys

from .cli import main

sys.exit(main())
