"""needle.nn: modules that compose into models (tensor in, tensor out)."""

from .attention import *
from .basic import *
from .conv import *
from .loss import *
from .module import *
from .sequence import *
from .sync_batchnorm import *
from .vocab_head import *
