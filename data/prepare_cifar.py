#!/usr/bin/env python
"""Prepare CIFAR-10/100 webdataset shards: a thin CLI over navit_pe.prepare (see data/README.md).

    python data/prepare_cifar.py                      # from ../shared/data/cifar10 into data/cifar10/
    python data/prepare_cifar.py --source cifar-100-python.tar.gz
    python data/prepare_cifar.py --download --dataset cifar100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from navit_pe.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
