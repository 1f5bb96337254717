#!/usr/bin/env python
"""Prepare webdataset shards from a folder of your own images: a thin CLI over
navit_pe.prepare_images (see data/README.md).

    python data/prepare_images.py ~/photos --name photos        # ~/photos/{train,test}/<class>/*.jpg
    python data/prepare_images.py photos.tar --name photos      # or a tar of such a tree
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from navit_pe.prepare_images import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
