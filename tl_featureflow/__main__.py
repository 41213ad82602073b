"""``python -m tl_featureflow ...`` is the ``featureflow`` command: the module torchrun launches
(``torchrun --nproc-per-node 2 -m tl_featureflow map --distributed ...``)."""

import sys

from tl_featureflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
