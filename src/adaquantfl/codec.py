"""Wire format v1 (DESIGN §7 import path); implemented in :mod:`adaquantfl.compression.codec`.

from adaquantfl.codec import encode, decode, encode_dense, decode_dense, CodecError
"""

from adaquantfl.compression.codec import *  # noqa: F403
from adaquantfl.compression.codec import __all__  # noqa: F401
