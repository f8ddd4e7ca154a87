"""eyed: an edge vision daemon that publishes labels, never pixels."""

import os

# OpenCV reads this limit when it is imported, which eyed's modules do after this one: an image whose header
# claims more pixels is refused as it is decoded (skipped and counted), before its memory is taken. OpenCV's own
# limit, 2**30 pixels, is 3 GB decoded, more than a Raspberry Pi has; 2**26 (67 megapixels, 200 MB decoded)
# holds any camera's photo. The environment may set another.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))

__version__ = "0.1.0"
